//! What the soak test breaks: workers (SIGKILL), the broker, its own Redis and SeaweedFS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddit_e2e::*;

fn wait_port(port: u16) {
    for _ in 0..300 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing listens on {port}");
}

/// A `redis-server` of the test's own on a spare port, with the persistence of the deploy
/// manifests' Redis (`deploy/compose.yaml` runs `redis:7.4` on its defaults: RDB snapshots at
/// `save 3600 1 300 100 60 10000`, no AOF), so its restart is what an operator's is: `SHUTDOWN`
/// (which writes the snapshot), then a start that loads it.
pub struct OwnRedis {
    pub url: String,
    port: u16,
    dir: PathBuf,
    child: Mutex<Child>,
}

impl OwnRedis {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn(port, &dir);
        Self {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            dir,
            child: Mutex::new(child),
        }
    }

    fn spawn(port: u16, dir: &Path) -> Child {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "3600 1 300 100 60 10000", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(port);
        child
    }

    /// `SHUTDOWN` (snapshot, then exit) and the wait for the process to end.
    fn shutdown(&self, child: &mut Child) {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "SHUTDOWN"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(!said.contains("ERR"), "redis refused to shut down: {said}");
        let _ = child.wait();
        eprintln!(
            "soak: redis SHUTDOWN, snapshot {} bytes",
            std::fs::metadata(self.dir.join("dump.rdb")).map_or(0, |m| m.len())
        );
    }

    /// Shuts Redis down, leaves it down for `down`, starts it again on its snapshot.
    pub fn restart(&self, down: Duration) {
        eprintln!("soak: restarting redis");
        let mut child = self.child.lock().unwrap();
        self.shutdown(&mut child);
        std::thread::sleep(down);
        *child = Self::spawn(self.port, &self.dir);
    }

    pub fn stop(&self) {
        self.shutdown(&mut self.child.lock().unwrap());
    }
}

/// `rabbitmqctl stop_app`, 5 s down, `start_app`.
pub fn restart_broker() {
    eprintln!("soak: restarting the broker");
    let ctl = |args: &[&str]| {
        let out = Command::new("rabbitmqctl").args(args).output().unwrap();
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    };
    ctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(5));
    ctl(&["start_app"]);
    ctl(&["await_startup"]);
}

struct Slots {
    workers: Vec<Worker>,
    logs: Vec<PathBuf>,
    started: usize,
    flags: Vec<String>,
    names: Names,
    model: PathBuf,
    dir: PathBuf,
}

impl Slots {
    fn spawn(&mut self) -> Worker {
        self.started += 1;
        let label = format!("soak-w{}", self.started);
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let w = Worker::start(&self.names, &self.model, &self.dir, &label, &flags);
        self.logs.push(w.log.clone());
        w
    }
}

/// Three workers with two intra-op threads each, on the test's Redis.
pub struct Fleet(Arc<Mutex<Slots>>);

pub struct Killer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Killer {
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

impl Fleet {
    /// Workers on the test's Redis (`redis_url`) that reach S3 at `s3_endpoint` (the gate).
    pub fn start(
        names: &Names,
        model: &Path,
        dir: &Path,
        redis_url: &str,
        s3_endpoint: &str,
    ) -> Self {
        let limit = names.delivery_limit.to_string();
        let flags = [
            ("--redis-url", redis_url.to_string()),
            ("--s3-endpoint", s3_endpoint.to_string()),
            (
                "--s3-input-buckets",
                var("DDIT_TEST_S3_LOCKED_BUCKET", "ddit-test-locked"),
            ),
            ("--delivery-limit", limit),
            ("--retry-delay-ms", "2000".into()),
            ("--intra-threads", "2".into()),
        ];
        let mut slots = Slots {
            workers: Vec::new(),
            logs: Vec::new(),
            started: 0,
            flags: flags
                .into_iter()
                .flat_map(|(f, v)| [f.to_string(), v])
                .collect(),
            names: names.clone(),
            model: model.to_path_buf(),
            dir: dir.to_path_buf(),
        };
        for _ in 0..3 {
            let w = slots.spawn();
            slots.workers.push(w);
        }
        for w in &mut slots.workers {
            w.wait_ready(Duration::from_secs(120));
        }
        Self(Arc::new(Mutex::new(slots)))
    }

    /// Every `period`, SIGKILL a random worker and start a new one in its place.
    pub fn kill_every(&self, period: Duration) -> Killer {
        let stop = Arc::new(AtomicBool::new(false));
        let (slots, flag) = (self.0.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = super::jobs::Rng::new(0x6b11);
            'run: loop {
                for _ in 0..(period.as_millis() / 100) {
                    if flag.load(Ordering::SeqCst) {
                        break 'run;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let mut s = slots.lock().unwrap();
                let at = rng.below(s.workers.len());
                s.workers[at].kill9();
                eprintln!("soak: killed worker {} with SIGKILL", at);
                let w = s.spawn();
                s.workers[at] = w;
            }
        });
        Killer { stop, thread }
    }

    /// SIGTERM to the worker in the first slot (all three are busy while the plan is being
    /// published): it drains on a thread of its own while a new one takes its place at once.
    /// Join the handle for its exit status.
    pub fn sigterm_one(&self) -> std::thread::JoinHandle<String> {
        let mut s = self.0.lock().unwrap();
        let w = s.spawn();
        let mut old = std::mem::replace(&mut s.workers[0], w);
        drop(s);
        eprintln!("soak: SIGTERM to a worker under load");
        old.sigterm();
        std::thread::spawn(move || {
            let status = old.child.wait().unwrap();
            format!("the worker sent SIGTERM exited: {status}")
        })
    }

    /// Stops every worker; returns every log any of them wrote.
    pub fn stop(self) -> Vec<String> {
        let mut s = self.0.lock().unwrap();
        s.workers.clear();
        s.logs
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect()
    }
}
