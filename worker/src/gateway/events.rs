//! A job's state, asked (`GET /v1/jobs/{id}`) or listened to (Server-Sent Events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use ddit_schemas::{JobResult, Progress};
use futures_util::{Stream, StreamExt};
use serde::Serialize;

use super::auth::Client;
use super::error::ApiError;
use super::Gateway;

/// Where a job stands.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobState {
    pub job_id: String,
    /// `queued`, `running`, or the result's status: `succeeded`, `failed`, `expired`, `canceled`.
    pub state: String,
    /// Sampler steps done and in all, while `running`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// The final result (`schemas/result.schema.json`), once there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<JobResult>,
}

impl JobState {
    fn new(job_id: &str, state: &str) -> Self {
        Self {
            job_id: job_id.into(),
            state: state.into(),
            step: None,
            total: None,
            result: None,
        }
    }

    fn of_result(r: JobResult) -> Self {
        let status = serde_json::to_value(r.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from));
        Self {
            result: Some(r),
            ..Self::new("", status.as_deref().unwrap_or("failed"))
        }
    }

    pub fn is_final(&self) -> bool {
        self.result.is_some()
    }
}

/// The job's state, if `client` submitted it (another client's job is not found, not forbidden).
pub async fn state(gw: &Gateway, client: &Client, job_id: &str) -> Result<JobState, ApiError> {
    let not_found = || ApiError::not_found(format!("no job `{job_id}`"));
    let rec = gw.redis.job_record(job_id).await?.ok_or_else(not_found)?;
    if rec.owner != client.name {
        return Err(not_found());
    }
    if let Some(r) = gw.redis.get_result(job_id).await? {
        return Ok(JobState {
            job_id: job_id.into(),
            ..JobState::of_result(r)
        });
    }
    Ok(match gw.redis.last_progress(job_id).await? {
        Some(p) => JobState {
            step: Some(p.step),
            total: Some(p.total),
            ..JobState::new(job_id, "running")
        },
        None => JobState::new(job_id, "queued"),
    })
}

/// Resolves once the gateway has begun to shut down (at once if it already has).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn event(name: &str, data: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "{}".into()))
}

/// `state` first, then `progress` events, then one `result` event, and the stream ends; it also
/// ends, without a result, when the gateway shuts down.
/// Subscribes before reading the state, so that nothing between the two is missed; pub/sub may
/// still drop a message across a Redis reconnect, so the result is also polled every 5 s.
pub async fn stream(
    gw: Arc<Gateway>,
    client: Client,
    job_id: String,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let channels = [
        gw.redis.progress_channel(&job_id),
        gw.redis.results_channel(),
    ];
    let pubsub = gw.redis.subscribe(&channels).await?;
    let first = state(&gw, &client, &job_id).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    let mut stopping = gw.stopping.subscribe();
    tokio::spawn(async move {
        let done = first.is_final();
        let _ = tx.send(event("state", &first)).await;
        if done {
            let _ = tx.send(event("result", &first.result)).await;
            return;
        }
        let mut messages = pubsub.into_on_message();
        let mut poll = tokio::time::interval(Duration::from_secs(5));
        let mut live = true;
        loop {
            let finished = tokio::select! {
                _ = tx.closed() => return,
                // The gateway is shutting down: the stream ends, with no result event.
                _ = stopped(&mut stopping) => return,
                _ = poll.tick() => true,
                m = messages.next(), if live => match m {
                    None => {
                        live = false;
                        true
                    }
                    Some(m) if m.get_channel_name() == channels[0] => {
                        if let Ok(p) = serde_json::from_slice::<Progress>(m.get_payload_bytes()) {
                            let _ = tx.send(event("progress", &p)).await;
                        }
                        false
                    }
                    Some(m) => m.get_payload_bytes() == job_id.as_bytes(),
                },
            };
            if finished {
                if let Ok(Some(r)) = gw.redis.get_result(&job_id).await {
                    let _ = tx.send(event("result", &r)).await;
                    return;
                }
            }
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
