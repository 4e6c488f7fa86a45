//! One Redis pub/sub connection per replica, fanned out to its event streams in the process: a
//! client holding many streams costs Redis nothing more. Each client may hold a bounded number of
//! streams on a replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::error::ApiError;
use crate::adapters::redis::ResultStore;

/// What a stream hears about its job.
#[derive(Debug, Clone)]
pub enum Note {
    /// A progress event's JSON, as the worker published it.
    Progress(Arc<[u8]>),
    /// A result was stored.
    Finished,
}

/// The replica's listeners, by scoped job id, and its open streams, by client.
pub struct Hub {
    jobs: Mutex<HashMap<String, broadcast::Sender<Note>>>,
    streams: Mutex<HashMap<String, usize>>,
    max_per_client: usize,
}

/// One open stream: its notes, and its place among its client's streams (given back on drop).
pub struct Watch {
    pub notes: broadcast::Receiver<Note>,
    hub: Arc<Hub>,
    key: String,
    client: String,
}

impl Hub {
    pub fn new(max_per_client: usize) -> Self {
        Self {
            jobs: Mutex::default(),
            streams: Mutex::default(),
            max_per_client,
        }
    }

    /// Listens to `key` (a scoped job id) for `client`; 429 over its streams on this replica.
    pub fn watch(self: &Arc<Self>, client: &str, key: &str) -> Result<Watch, ApiError> {
        let poisoned = || ApiError::internal("event hub lock poisoned");
        {
            let mut streams = self.streams.lock().map_err(|_| poisoned())?;
            let open = streams.entry(client.to_string()).or_default();
            if *open >= self.max_per_client {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!(
                        "{open} event streams open; the limit is {}",
                        self.max_per_client
                    ),
                )
                .retry_after(5));
            }
            *open += 1;
        }
        let notes = self
            .jobs
            .lock()
            .map_err(|_| poisoned())?
            .entry(key.to_string())
            .or_insert_with(|| broadcast::channel(32).0)
            .subscribe();
        Ok(Watch {
            notes,
            hub: self.clone(),
            key: key.to_string(),
            client: client.to_string(),
        })
    }

    fn send(&self, key: &str, note: Note) {
        if let Ok(jobs) = self.jobs.lock() {
            if let Some(tx) = jobs.get(key) {
                let _ = tx.send(note);
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(mut streams) = self.hub.streams.lock() {
            if let Some(n) = streams.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    streams.remove(&self.client);
                }
            }
        }
        if let Ok(mut jobs) = self.hub.jobs.lock() {
            // This watch's receiver is still alive here: it is the last one when the count is 1.
            if jobs
                .get(&self.key)
                .is_some_and(|tx| tx.receiver_count() <= 1)
            {
                jobs.remove(&self.key);
            }
        }
    }
}

/// Holds the replica's one pub/sub connection (reconnecting after a second when it drops) and
/// hands each message to the streams of its job, until the hub is dropped. A stream polls its
/// result too, so a message lost across a reconnect delays it but never loses it.
pub async fn listen_forever(hub: Weak<Hub>, redis: ResultStore) {
    let results = redis.results_channel();
    let progress = redis.progress_channel("");
    loop {
        match redis.subscribe_events().await {
            Ok(ps) => {
                let mut messages = ps.into_on_message();
                while let Some(m) = messages.next().await {
                    let Some(hub) = hub.upgrade() else { return };
                    let channel = m.get_channel_name();
                    if channel == results {
                        let key = String::from_utf8_lossy(m.get_payload_bytes());
                        hub.send(&key, Note::Finished);
                    } else if let Some(key) = channel.strip_prefix(&progress) {
                        hub.send(key, Note::Progress(m.get_payload_bytes().into()));
                    }
                }
                tracing::warn!("redis pub/sub connection closed; reconnecting");
            }
            Err(e) => tracing::warn!("redis pub/sub: {e}"),
        }
        if hub.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
