//! Attempts that end. Every admitted delivery of a job is counted (a Redis counter, less the
//! admissions the copy's `x-ddit-uncharged` header takes back; the copy's own `x-ddit-attempts`
//! header; and the quorum queue's `x-delivery-count`, whichever is highest, so a flushed Redis
//! or a broker whose nacks do not count still ends). What the worker sends back without having
//! run it (a job never started at a drain, a success whose result could not be stored) goes back
//! as a fresh copy that carries the attempts made, never as a requeue that some brokers count. A transient failure sends
//! the job back through the retry queue after a growing, jittered delay, never a hot loop. The last
//! allowed attempt stores a final `failed` result with the kind, the last cause and the attempt
//! count, and dead-letters the message. A message without a usable job id goes to the dead-letter
//! exchange with an `x-ddit-reason` header and no result.

use std::time::Duration;

use ddit_schemas::{ErrorInfo, ErrorKind, JobResult, Status};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Acker, BasicProperties};

use super::deliveries::{InFlight, Service};
use crate::adapters::amqp::{self, Message};
use crate::error::WorkerError;
use crate::runner::ended_result;

/// Attempts already made, on a copy sent back through the retry queue.
pub const ATTEMPTS_HEADER: &str = "x-ddit-attempts";
/// Admissions counted in Redis that were no attempt (see [`attempt_of`]).
pub const UNCHARGED_HEADER: &str = "x-ddit-uncharged";
/// Why a message went to the dead-letter queue without a result.
pub const REASON_HEADER: &str = "x-ddit-reason";

/// The wait before the attempt after `attempt`: `base` doubled per attempt up to 60 s, scaled
/// by a random factor in [0.5, 1) so that jobs failing together spread out.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let doubled = base.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    doubled
        .min(Duration::from_secs(60))
        .mul_f64(crate::adapters::jitter())
}

/// Which attempt a delivery is, given the Redis count (the highest of the three counts; the
/// Redis count less the admissions the copy says were no attempt).
pub fn attempt_of(props: &BasicProperties, counted: u32) -> u32 {
    let uncharged = amqp::header_count(props, UNCHARGED_HEADER).unwrap_or(0);
    let ours = amqp::header_count(props, ATTEMPTS_HEADER).map_or(1, |n| n.saturating_add(1));
    let broker = amqp::header_count(props, "x-delivery-count").map_or(1, |n| n.saturating_add(1));
    counted.saturating_sub(uncharged).max(ours).max(broker)
}

/// What a retried copy is made of: the body and the headers (the broker's counters left out).
#[derive(Clone)]
pub struct Retained {
    pub body: Vec<u8>,
    pub headers: FieldTable,
}

impl Retained {
    pub fn of(d: &Delivery) -> Self {
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .filter(|(k, _)| !k.as_str().starts_with("x-delivery-count"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into()
            })
            .unwrap_or_default();
        Self {
            body: d.data.clone(),
            headers,
        }
    }
}

/// The final result of a job whose attempts ran out: the last cause, or, when no attempt could
/// record one (each ended with the worker dying or losing the broker), a message saying so.
pub fn exhausted(
    svc: &Service,
    job_id: &str,
    task: Option<&str>,
    last: Option<ErrorInfo>,
    attempts: u32,
) -> JobResult {
    let mut r = ended_result(&svc.model, job_id, task, Status::Failed, None);
    r.error = Some(
        last.unwrap_or(ErrorInfo {
            kind: ErrorKind::Internal,
            message: "no attempt ended with a result (a worker died or lost the broker while \
                  running the job)"
                .into(),
            retryable: true,
        }),
    );
    r.attempts = Some(attempts);
    r
}

impl Service {
    /// Sends a job back to the work queue after `delay`: a copy carrying `attempts` goes to the
    /// retry queue, whose per-message TTL dead-letters it back, then every delivery of the job
    /// here is acked. Unlike a nack, this neither counts toward the broker's delivery limit nor
    /// loops at once. If no copy can be published, the deliveries are nacked after the delay.
    pub(super) async fn retry_later(
        &self,
        ackers: &[Acker],
        msg: &Retained,
        attempts: u32,
        step: u32,
    ) {
        let delay = backoff(self.cfg.retry_delay, step);
        let mut headers = msg.headers.clone();
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(attempts));
        let queue = self.cfg.amqp.retry_queue(step);
        let copy = Message {
            exchange: "",
            routing_key: &queue,
            body: &msg.body,
            headers,
            expiration_ms: Some(delay.as_millis() as u64),
        };
        let sent = match &self.publisher {
            Some(ch) => amqp::publish(ch, copy).await,
            None => Err(WorkerError::Internal("no publishing channel".into())),
        };
        match sent {
            Ok(()) => {
                tracing::info!(
                    attempts,
                    delay_ms = delay.as_millis() as u64,
                    "retry scheduled"
                );
                for a in ackers {
                    if let Err(e) = a.ack(BasicAckOptions::default()).await {
                        tracing::warn!("ack: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::warn!("cannot schedule a retry ({e}); requeueing after the delay");
                tokio::time::sleep(delay.min(Duration::from_secs(5))).await;
                for a in ackers {
                    Self::nack_requeue(a).await;
                }
            }
        }
    }

    /// A job handed over at a drain but never started: a copy carrying the attempts made goes
    /// back to the work queue, then its deliveries are acked, so that no broker counts a
    /// delivery that never ran (RabbitMQ before 4.3 counts a requeue in `x-delivery-count`).
    /// The admission is taken back in Redis, or, if Redis cannot, by the copy's header. If no
    /// copy can be published, the deliveries are requeued.
    pub(super) async fn requeue_unstarted(&self, job_id: &str, f: &InFlight) {
        let mut msg = f.message.clone();
        if let Err(e) = self.redis.forget_attempt(job_id).await {
            tracing::warn!("attempt count of {job_id}: {e}; the copy takes it back");
            uncharge(&mut msg.headers);
        }
        self.send_back(msg, f.attempt.saturating_sub(1), f.ackers())
            .await;
    }

    /// A job in hand that did not run to its end here (handed over and not started at a drain, or
    /// given back by a runner halted by the circuit breaker): requeued as
    /// [`Self::requeue_unstarted`] does. Returns whether it was in flight.
    pub(super) async fn take_back(&mut self, job_id: &str) -> bool {
        let Some(f) = self.in_flight.remove(job_id) else {
            return false;
        };
        self.requeue_unstarted(job_id, &f).await;
        for _ in f.ackers() {
            self.metrics.in_flight.dec();
        }
        true
    }

    /// Deliveries the broker sent before the consumer was canceled and the loop never took:
    /// sent back the same way (a channel closed on them would requeue them, and RabbitMQ before
    /// 4.3 would count that). Returns how many.
    pub(super) async fn return_unadmitted(&self, consumer: &mut lapin::Consumer) -> usize {
        use futures_util::StreamExt;
        let mut n = 0;
        let wait = Duration::from_millis(200);
        while let Ok(Some(Ok(d))) = tokio::time::timeout(wait, consumer.next()).await {
            let made = attempt_of(&d.properties, 0).saturating_sub(1);
            self.send_back(Retained::of(&d), made, std::iter::once(&d.acker))
                .await;
            n += 1;
        }
        n
    }

    /// A fresh copy of `msg` carrying `made` attempts goes to the work queue (confirmed); then the
    /// deliveries are acked, or requeued if no copy could be published.
    async fn send_back(&self, mut msg: Retained, made: u32, ackers: impl Iterator<Item = &Acker>) {
        msg.headers
            .insert(ATTEMPTS_HEADER.into(), AMQPValue::LongUInt(made));
        let copy = Message {
            exchange: "",
            routing_key: &self.cfg.amqp.queue,
            body: &msg.body,
            headers: msg.headers,
            expiration_ms: None,
        };
        let sent = match &self.publisher {
            Some(ch) => amqp::publish(ch, copy).await,
            None => Err(WorkerError::Internal("no publishing channel".into())),
        };
        for a in ackers {
            match &sent {
                Ok(()) => {
                    if let Err(e) = a.ack(BasicAckOptions::default()).await {
                        tracing::warn!("ack: {e}");
                    }
                }
                Err(_) => Self::nack_requeue(a).await,
            }
        }
        if let Err(e) = sent {
            tracing::warn!("cannot requeue a copy ({e}); requeued the delivery");
        }
    }

    /// A run whose final result could not be stored goes back through the retry queue without
    /// being charged as an attempt (its copy takes the Redis admission back), so that a success
    /// during a Redis outage on the last attempt is not turned into `failed`. At most
    /// `--delivery-limit` runs are given back this way; past that, they are charged.
    pub(super) async fn retry_unstored(&self, f: &InFlight) {
        let ackers: Vec<Acker> = f.ackers().cloned().collect();
        let mut msg = f.message.clone();
        let given = amqp::field_count(&msg.headers, UNCHARGED_HEADER).unwrap_or(0);
        let made = if given < self.cfg.amqp.delivery_limit {
            uncharge(&mut msg.headers);
            f.attempt.saturating_sub(1)
        } else {
            f.attempt
        };
        self.retry_later(&ackers, &msg, made, 1).await;
    }

    /// A message with no usable job id: no result slot can be named, so it goes to the
    /// dead-letter exchange with the reason as a header (a plain reject if that fails).
    pub(super) async fn dead_letter_unusable(&self, d: &Delivery, reason: &str) {
        tracing::warn!(
            delivery_tag = d.delivery_tag,
            "dead-lettering without a result: {reason}"
        );
        let mut headers = Retained::of(d).headers;
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        let copy = Message {
            exchange: &self.cfg.amqp.dead_letter_exchange,
            routing_key: "",
            body: &d.data,
            headers,
            expiration_ms: None,
        };
        let sent = match &self.publisher {
            Some(ch) => amqp::publish(ch, copy).await.is_ok(),
            None => false,
        };
        let res = if sent {
            d.acker.ack(BasicAckOptions::default()).await
        } else {
            d.acker.reject(BasicRejectOptions { requeue: false }).await
        };
        if let Err(e) = res {
            tracing::warn!("ack: {e}");
        }
    }
}

/// Adds one to a copy's count of admissions that were no attempt.
fn uncharge(headers: &mut FieldTable) {
    let n = amqp::field_count(headers, UNCHARGED_HEADER).unwrap_or(0);
    headers.insert(
        UNCHARGED_HEADER.into(),
        AMQPValue::LongUInt(n.saturating_add(1)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(pairs: &[(&str, u32)]) -> BasicProperties {
        let mut h = FieldTable::default();
        for (k, v) in pairs {
            h.insert((*k).into(), AMQPValue::LongLongInt((*v).into()));
        }
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn the_highest_count_wins() {
        assert_eq!(attempt_of(&props(&[]), 1), 1);
        assert_eq!(attempt_of(&props(&[]), 3), 3);
        // Redis flushed: the copy's header still counts.
        assert_eq!(attempt_of(&props(&[(ATTEMPTS_HEADER, 4)]), 1), 5);
        // Crash redeliveries the worker never saw end: the broker's count.
        assert_eq!(attempt_of(&props(&[("x-delivery-count", 2)]), 1), 3);
        // Admissions given back by the copy do not count; the other counts still do.
        assert_eq!(attempt_of(&props(&[(UNCHARGED_HEADER, 2)]), 3), 1);
        let given_back = [(UNCHARGED_HEADER, 1), (ATTEMPTS_HEADER, 1)];
        assert_eq!(attempt_of(&props(&given_back), 3), 2);
        assert_eq!(attempt_of(&props(&[(UNCHARGED_HEADER, 9)]), 3), 1);
    }

    #[test]
    fn uncharging_counts_up() {
        let mut h = FieldTable::default();
        uncharge(&mut h);
        uncharge(&mut h);
        assert_eq!(amqp::field_count(&h, UNCHARGED_HEADER), Some(2));
    }

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let base = Duration::from_millis(1000);
        for attempt in 1..=12 {
            let full = (base * (1 << (attempt - 1).min(16))).min(Duration::from_secs(60));
            let d = backoff(base, attempt);
            assert!(
                d >= full / 2 && d < full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
    }
}
