//! Inference threads: each owns an engine (its own ONNX Runtime sessions) and a runner, fed by a
//! bounded channel. The async side never runs a model, so AMQP heartbeats and acks stay on time.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ddit_schemas::{Job, JobResult};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::breaker::Breaker;
use crate::adapters::s3::S3Io;
use crate::engine::{Engine, EngineConfig, Package};
use crate::error::{Result, WorkerError};
use crate::runner::{
    encode_images, Decoded, Handoff, Hooks, ImageSink, Incoming, JobSource, Png, Runner,
    RunnerConfig, Wait,
};
use crate::text::TextCodec;

/// What inference threads report to the async side.
pub enum Event {
    Ready,
    LoadFailed(String),
    Result(Box<JobResult>),
    Progress {
        job_id: String,
        step: usize,
        total: usize,
    },
    Step {
        kind: &'static str,
        rows: usize,
        seconds: f64,
    },
    /// The circuit breaker opened (sent once).
    BreakerOpen,
    /// A job a halted runner gave back unfinished.
    GivenBack(String),
}

/// Job ids a client asked to cancel (kept current by the async side).
pub type CancelSet = Arc<Mutex<HashSet<String>>>;

/// A job, the span its steps are recorded under, and when its delivery arrived (the job timeout
/// counts from then).
pub type Sent = (Job, tracing::Span, std::time::Instant);

/// The jobs handed to the inference threads and not yet taken by one.
pub type Queued = Arc<tokio::sync::Mutex<mpsc::Receiver<Sent>>>;

struct ChannelSource {
    rx: Queued,
    /// Set when the service drains: no queued job starts any more.
    draining: Arc<AtomicBool>,
    /// The service's runtime, whose timer bounds a wait with a deadline.
    handle: tokio::runtime::Handle,
}

fn incoming((job, span, received): Sent) -> Incoming {
    Incoming::Job {
        job: Box::new(job),
        span,
        received: Some(received),
    }
}

impl JobSource for ChannelSource {
    fn next_job(&mut self, wait: Wait) -> Option<Incoming> {
        if self.draining.load(Ordering::SeqCst) {
            return None;
        }
        match wait {
            Wait::Forever => self.rx.blocking_lock().blocking_recv().map(incoming),
            // Never wait for another thread's blocking receive while jobs are running here.
            Wait::No => self.rx.try_lock().ok()?.try_recv().ok().map(incoming),
            // Tokio's timeout polls its future before the deadline, so a past one is a try.
            Wait::Until(t) => {
                let t = tokio::time::Instant::from_std(t);
                let rx = &self.rx;
                let next = async move {
                    let mut rx = tokio::time::timeout_at(t, rx.lock()).await.ok()?;
                    tokio::time::timeout_at(t, rx.recv()).await.ok().flatten()
                };
                self.handle.block_on(next).map(incoming)
            }
        }
    }
}

struct EventHooks {
    tx: mpsc::UnboundedSender<Event>,
    canceled: CancelSet,
    breaker: Arc<Breaker>,
}

impl Hooks for EventHooks {
    fn progress(&mut self, job_id: &str, step: usize, total: usize) {
        let _ = self.tx.send(Event::Progress {
            job_id: job_id.to_string(),
            step,
            total,
        });
    }
    fn canceled(&mut self, job_id: &str) -> bool {
        self.canceled
            .lock()
            .map(|s| s.contains(job_id))
            .unwrap_or(false)
    }
    fn result(&mut self, r: JobResult) {
        let _ = self.tx.send(Event::Result(Box::new(r)));
    }
    fn step(&mut self, kind: &'static str, rows: usize, seconds: f64) {
        self.breaker.success();
        let _ = self.tx.send(Event::Step {
            kind,
            rows,
            seconds,
        });
    }
    fn failure(&mut self, e: &WorkerError) {
        if self.breaker.failure(e) {
            let _ = self.tx.send(Event::BreakerOpen);
        }
    }
    fn halted(&mut self) -> bool {
        self.breaker.is_open()
    }
    fn given_back(&mut self, job_id: &str) {
        let _ = self.tx.send(Event::GivenBack(job_id.to_string()));
    }
}

/// The service's image sink: PNG encoding and the S3 uploads of a finished job run on the runtime,
/// beside the step loop, and its result is reported once every object is stored (or failed when
/// one could not be). The result is the only one the job gets: nothing else reports it.
struct Uploads {
    io: S3Io,
    events: mpsc::UnboundedSender<Event>,
}

impl ImageSink for Uploads {
    fn put(&mut self, job_id: &str, index: u32, png: &[u8], seed: u64) -> Result<String> {
        let png = Png::of(png.to_vec());
        self.io
            .handle
            .block_on(self.io.put_png(job_id, index, &png, seed))
    }

    fn finish(&mut self, job: Decoded) -> Option<JobResult> {
        let (io, events) = (self.io.clone(), self.events.clone());
        let span = tracing::Span::current();
        self.io.handle.spawn(
            async move {
                let result = upload(&io, job).await;
                let _ = events.send(Event::Result(Box::new(result)));
            }
            .instrument(span),
        );
        None
    }
}

/// Encodes (on a blocking thread) and uploads a job's images; its completed result.
async fn upload(io: &S3Io, mut job: Decoded) -> JobResult {
    let images = std::mem::take(&mut job.images);
    let encoded = tokio::task::spawn_blocking(move || {
        let run = std::panic::AssertUnwindSafe(|| encode_images(&images));
        let pngs = std::panic::catch_unwind(run)
            .unwrap_or_else(|_| Err(WorkerError::Internal("PNG encoding panicked".into())));
        (images, pngs)
    })
    .await;
    let pngs = match encoded {
        Ok((images, pngs)) => {
            job.images = images;
            pngs
        }
        Err(e) => Err(WorkerError::Internal(format!("PNG encoding: {e}"))),
    };
    let stored = match pngs {
        Ok(pngs) => {
            let job_id = &job.result.job_id;
            let puts = pngs
                .iter()
                .zip(&job.images)
                .enumerate()
                .map(|(i, (p, (_, seed)))| io.put_png(job_id, i as u32, p, *seed));
            futures_util::future::try_join_all(puts)
                .await
                .map(|uris| pngs.into_iter().zip(uris).collect())
        }
        Err(e) => Err(e),
    };
    job.complete(stored)
}

/// Counts a live inference thread until dropped (also when the thread unwinds from a panic).
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Pool {
    pub jobs: mpsc::Sender<Sent>,
    /// The receiving end the threads share: on drain the service takes back what none started.
    pub queued: Queued,
    pub draining: Arc<AtomicBool>,
    pub threads: Vec<JoinHandle<()>>,
}

pub struct PoolConfig {
    pub threads: usize,
    /// Verified once by the caller; each thread only creates its sessions.
    pub package: Package,
    pub engine: EngineConfig,
    pub runner: RunnerConfig,
    pub capacity: usize,
    /// Counts the threads that run (`/healthz` fails when one has died).
    pub alive: Arc<AtomicUsize>,
    pub breaker: Arc<Breaker>,
}

pub fn start(
    cfg: PoolConfig,
    io: S3Io,
    canceled: CancelSet,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Pool> {
    let (tx, rx) = mpsc::channel::<Sent>(cfg.capacity.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let draining = Arc::new(AtomicBool::new(false));
    let alive = cfg.alive.clone();
    let handoff = Handoff::new();
    let threads = (0..cfg.threads.max(1))
        .map(|i| {
            let handoff = handoff.clone();
            alive.fetch_add(1, Ordering::SeqCst);
            let guard = Alive(alive.clone());
            let rx = rx.clone();
            let draining = draining.clone();
            let events = events.clone();
            let canceled = canceled.clone();
            let breaker = cfg.breaker.clone();
            let fetcher = io.clone();
            let mut sink = Uploads {
                io: io.clone(),
                events: events.clone(),
            };
            let package = cfg.package.clone();
            let ecfg = cfg.engine.clone();
            let rcfg = cfg.runner.clone();
            std::thread::Builder::new()
                .name(format!("ddit-inference-{i}"))
                .spawn(move || {
                    let _alive = guard;
                    let loaded = Engine::load(&package, &ecfg).and_then(|e| {
                        let codec = TextCodec::for_package(&e.tokenizer_path, &e.manifest.values)?;
                        Ok((e, codec))
                    });
                    let (mut engine, codec) = match loaded {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = events.send(Event::LoadFailed(e.to_string()));
                            return;
                        }
                    };
                    let _ = events.send(Event::Ready);
                    let mut source = ChannelSource {
                        rx,
                        draining,
                        handle: fetcher.handle.clone(),
                    };
                    let mut hooks = EventHooks {
                        tx: events,
                        canceled,
                        breaker,
                    };
                    Runner::new(&mut engine, &codec, &fetcher, rcfg)
                        .with_handoff(handoff)
                        .run(&mut source, &mut sink, &mut hooks);
                })
                .map_err(|e| WorkerError::io("spawning an inference thread", e))
        })
        .collect::<Result<_>>()?;
    Ok(Pool {
        jobs: tx,
        queued: rx,
        draining,
        threads,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use super::*;

    fn job(id: &str) -> Sent {
        let v = serde_json::json!({"job_id": id, "task": "generate", "params": {"prompt": "x"}});
        (
            serde_json::from_value(v).unwrap(),
            tracing::Span::none(),
            Instant::now(),
        )
    }

    fn id(inc: Option<Incoming>) -> Option<String> {
        match inc? {
            Incoming::Job { job, .. } => Some(job.job_id),
            Incoming::Unparseable { job_id, .. } => Some(job_id),
        }
    }

    #[test]
    fn a_wait_with_a_deadline_takes_what_arrives_before_it_and_gives_up_at_it() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let mut source = ChannelSource {
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
            draining: Arc::new(AtomicBool::new(false)),
            handle: rt.handle().clone(),
        };
        let later = tx.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            later.blocking_send(job("late")).unwrap();
        });
        let got = source.next_job(Wait::Until(Instant::now() + Duration::from_secs(30)));
        assert_eq!(id(got).as_deref(), Some("late"));
        sender.join().unwrap();

        let asked = Instant::now();
        assert!(source
            .next_job(Wait::Until(asked + Duration::from_millis(30)))
            .is_none());
        assert!(
            asked.elapsed() >= Duration::from_millis(30),
            "it gave up early"
        );
        assert!(source.next_job(Wait::No).is_none());

        // A deadline already past still takes a queued job, as `Wait::No` does.
        tx.blocking_send(job("queued")).unwrap();
        let got = source.next_job(Wait::Until(asked));
        assert_eq!(id(got).as_deref(), Some("queued"));

        source.draining.store(true, Ordering::SeqCst);
        tx.blocking_send(job("drained")).unwrap();
        assert!(source.next_job(Wait::Forever).is_none());
    }
}
