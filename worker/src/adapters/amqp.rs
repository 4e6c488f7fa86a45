//! AMQP (RabbitMQ) through lapin: a durable quorum queue with a delivery limit and a dead-letter
//! exchange and queue; a retry queue whose per-message TTL dead-letters each copy back to the work
//! queue (delayed retries that never touch the delivery count); bounded prefetch; manual acks;
//! publisher confirms for publishing.

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use crate::error::{Result, WorkerError};

#[derive(Clone)]
pub struct AmqpConfig {
    pub url: String,
    pub queue: String,
    pub prefetch: u16,
    /// Deliveries (first one included) after which a message is dead-lettered.
    pub delivery_limit: u32,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// A private CA (PEM) that `amqps://` servers are verified against, besides the system's.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &super::secret::redacted(&self.url))
            .field("queue", &self.queue)
            .field("prefetch", &self.prefetch)
            .field("delivery_limit", &self.delivery_limit)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("private_ca", &self.ca_pem.is_some())
            .finish()
    }
}

impl AmqpConfig {
    /// Where a retry after backoff step `step` waits: `{queue}.retry.{step}`, one queue per step
    /// (the last one shared by the steps beyond it). A message expires only at the head of its
    /// queue, so one queue holds only TTLs of one step's jitter range, [½, 1) × its delay: a short
    /// delay never waits behind a long one.
    pub fn retry_queue(&self, step: u32) -> String {
        format!("{}.retry.{}", self.queue, step.clamp(1, self.retry_steps()))
    }

    /// Every retry queue of this work queue.
    pub fn retry_queues(&self) -> Vec<String> {
        (1..=self.retry_steps())
            .map(|s| self.retry_queue(s))
            .collect()
    }

    /// How many retries a job can have: one fewer than its attempts (at least one queue).
    fn retry_steps(&self) -> u32 {
        self.delivery_limit.saturating_sub(1).max(1)
    }
}

fn unavailable(what: &str, e: lapin::Error) -> WorkerError {
    WorkerError::unavailable(format!("amqp {what}"), e)
}

/// Connects with lapin's auto-recovery (reconnects and restores topology after a broker restart).
/// `amqps://` is TLS (rustls) verified against the system's roots or `ca_pem`: a plaintext
/// server or a certificate that does not verify is an error, never a plaintext fallback.
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Connection> {
    super::install_crypto();
    let props = ConnectionProperties::default()
        .enable_auto_recover()
        .with_connection_name(name.into());
    let tls = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: cfg.ca_pem.clone(),
    };
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| WorkerError::unavailable("amqp runtime", e))?;
    // A handshake that never completes (a TLS client at a plaintext port, a silent peer) must end
    // in an error, not a wait. A malformed URL's error may echo it: the password is scrubbed.
    let connecting = Connection::connect_with_config(&cfg.url, props, tls, runtime);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(WorkerError::unavailable(
            "amqp connect",
            super::secret::scrub(&e.to_string(), &cfg.url),
        )),
        Err(_) => Err(WorkerError::unavailable(
            "amqp connect",
            format!("no handshake within {CONNECT_TIMEOUT:?}"),
        )),
    }
}

/// How long a connection (TCP, TLS and the AMQP handshake) may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Declares the dead-letter exchange and queue, then the work queue (idempotent).
pub async fn declare(ch: &Channel, cfg: &AmqpConfig) -> Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    ch.exchange_declare(
        ShortString::from(cfg.dead_letter_exchange.as_str()),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| unavailable("declare dead-letter exchange", e))?;
    let mut dlq_args = FieldTable::default();
    dlq_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        ShortString::from(cfg.dead_letter_queue.as_str()),
        durable,
        dlq_args,
    )
    .await
    .map_err(|e| unavailable("declare dead-letter queue", e))?;
    ch.queue_bind(
        ShortString::from(cfg.dead_letter_queue.as_str()),
        ShortString::from(cfg.dead_letter_exchange.as_str()),
        ShortString::from(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| unavailable("bind dead-letter queue", e))?;
    ch.queue_declare(
        ShortString::from(cfg.queue.as_str()),
        durable,
        queue_args(cfg),
    )
    .await
    .map_err(|e| unavailable("declare queue", e))?;
    for q in cfg.retry_queues() {
        ch.queue_declare(
            ShortString::from(q.as_str()),
            durable,
            retry_queue_args(cfg),
        )
        .await
        .map_err(|e| unavailable("declare retry queue", e))?;
    }
    Ok(())
}

/// A retry queue: nothing consumes it; an expired copy is dead-lettered, at least once, through
/// the default exchange back to the work queue.
fn retry_queue_args(cfg: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", cfg.queue.as_str()),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        args.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    args
}

/// The work queue's arguments (clients declaring it must use the same).
pub fn queue_args(cfg: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(cfg.delivery_limit as i32),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(cfg.dead_letter_exchange.as_str())),
    );
    args
}

/// A consumer with bounded prefetch and manual acknowledgement.
pub async fn consume(ch: &Channel, cfg: &AmqpConfig, tag: &str) -> Result<Consumer> {
    ch.basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| unavailable("qos", e))?;
    ch.basic_consume(
        ShortString::from(cfg.queue.as_str()),
        ShortString::from(tag),
        BasicConsumeOptions {
            no_ack: false,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| unavailable("consume", e))
}

/// Publishes a job (persistent, JSON) and waits for the broker's confirm.
pub async fn publish_job(
    ch: &Channel,
    queue: &str,
    body: &[u8],
    traceparent: Option<&str>,
) -> Result<()> {
    let mut headers = FieldTable::default();
    if let Some(tp) = traceparent {
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from(tp)),
        );
    }
    let msg = Message {
        exchange: "",
        routing_key: queue,
        body,
        headers,
        expiration_ms: None,
    };
    publish(ch, msg).await
}

/// A persistent JSON message to publish with confirms.
pub struct Message<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub headers: FieldTable,
    /// Per-message TTL (the retry queue's delay).
    pub expiration_ms: Option<u64>,
}

/// Publishes `m` and waits for the broker's confirm. It is `mandatory`: a message that no queue
/// receives (a deleted queue, a missing binding) comes back, and that is an error naming where
/// it went, as is a nack; only a message some queue took is `Ok`. The channel is put in confirm
/// mode on its first publish (one round trip, once).
pub async fn publish(ch: &Channel, m: Message<'_>) -> Result<()> {
    if !ch.status().confirm() {
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| unavailable("confirm_select", e))?;
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_headers(m.headers);
    if let Some(ms) = m.expiration_ms {
        props = props.with_expiration(ShortString::from(ms.to_string()));
    }
    let confirm = ch
        .basic_publish(
            ShortString::from(m.exchange),
            ShortString::from(m.routing_key),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            m.body,
            props,
        )
        .await
        .map_err(|e| unavailable("publish", e))?;
    let c = confirm
        .await
        .map_err(|e| unavailable("publish confirm", e))?;
    let nacked = c.is_nack();
    if let Some(back) = c.take_message() {
        return Err(unroutable(m.exchange, m.routing_key, &back.reply_text));
    }
    if nacked {
        return Err(WorkerError::unavailable(
            "amqp publish",
            "the broker nacked the message",
        ));
    }
    Ok(())
}

/// A mandatory message the broker returned: no queue took it.
fn unroutable(exchange: &str, routing_key: &str, why: &ShortString) -> WorkerError {
    let to = if exchange.is_empty() {
        format!("queue {routing_key:?}")
    } else {
        format!("exchange {exchange:?} (routing key {routing_key:?})")
    };
    WorkerError::unavailable(
        format!("amqp publish to {to}"),
        format!("no queue received the message ({})", why.as_str()),
    )
}

/// A string header of a delivery (e.g. `traceparent`).
pub fn header(props: &BasicProperties, name: &str) -> Option<String> {
    let h = props.headers().as_ref()?;
    match h.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// A numeric header (e.g. the quorum queue's `x-delivery-count`), whatever integer type it came as.
pub fn header_count(props: &BasicProperties, name: &str) -> Option<u32> {
    field_count(props.headers().as_ref()?, name)
}

/// A numeric field of a header table, whatever integer type it came as.
pub fn field_count(h: &FieldTable, name: &str) -> Option<u32> {
    let n: i64 = match h.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> AmqpConfig {
        AmqpConfig {
            url: url.into(),
            queue: "q".into(),
            prefetch: 1,
            delivery_limit: 5,
            dead_letter_exchange: "x".into(),
            dead_letter_queue: "x.q".into(),
            ca_pem: None,
        }
    }

    #[test]
    fn the_password_stays_out_of_debug_and_errors() {
        let c = cfg("amqp://ddit:hunter2@127.0.0.1:5672/%2f");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("ddit:***@127.0.0.1"),
            "{shown}"
        );
        // A malformed URL fails before any network; its error must not echo the password.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        for url in [
            "amqp://ddit:hunter2@127.0.0.1:notaport/%2f",
            "amqp://ddit:hunter2@[::1/%2f",
        ] {
            let e = rt
                .block_on(connect(&cfg(url), "t"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!e.is_empty(), "{url} connected");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
