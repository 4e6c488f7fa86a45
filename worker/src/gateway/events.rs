//! A job's state, asked (`GET /v1/jobs/{id}`) or listened to (Server-Sent Events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use ddit_schemas::{JobResult, Progress};
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;

use super::auth::Client;
use super::error::ApiError;
use super::hub::Note;
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

/// The state of `client`'s job `job_id` (its scoped id names only this client's jobs: another
/// client's id, or a job published straight to the broker, is simply not found).
pub async fn state(gw: &Gateway, client: &Client, job_id: &str) -> Result<JobState, ApiError> {
    let view = gw.redis.job_view(&client.scoped(job_id)).await?;
    if let Some(mut r) = view.result {
        r.job_id = job_id.into();
        return Ok(JobState {
            job_id: job_id.into(),
            ..JobState::of_result(r)
        });
    }
    if let Some(p) = view.progress {
        return Ok(JobState {
            step: Some(p.step),
            total: Some(p.total),
            ..JobState::new(job_id, "running")
        });
    }
    match view.record {
        Some(rec) if rec.owner == client.name => Ok(JobState::new(job_id, "queued")),
        _ => Err(ApiError::not_found(format!("no job `{job_id}`"))),
    }
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

/// `state` first, then `progress` events, then one `result` event, and the stream ends. It also
/// ends, without a result, when the gateway shuts down or the stream reaches `--max-stream-secs`
/// (an `EventSource` reconnects). The job is authorized before anything listens; the stream
/// then hears the replica's one pub/sub connection, and polls the result every 5 s (and once at
/// once, for a result stored between the first read and the listening).
pub async fn stream(
    gw: Arc<Gateway>,
    client: Client,
    job_id: String,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let first = state(&gw, &client, &job_id).await?;
    let mut watch = gw.hub.watch(&client.name, &client.scoped(&job_id))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    let mut stopping = gw.stopping.subscribe();
    let lifetime = gw.cfg.max_stream;
    tokio::spawn(async move {
        let _ = tx.send(event("state", &first)).await;
        if first.is_final() {
            let _ = tx.send(event("result", &first.result)).await;
            return;
        }
        let key = client.scoped(&job_id);
        let mut poll = tokio::time::interval(Duration::from_secs(5));
        let end = tokio::time::sleep(lifetime);
        tokio::pin!(end);
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                _ = stopped(&mut stopping) => return,
                _ = &mut end => return,
                _ = poll.tick() => None,
                n = watch.notes.recv() => match n {
                    Ok(Note::Progress(bytes)) => serde_json::from_slice::<Progress>(&bytes)
                        .ok()
                        .map(|mut p| {
                            p.job_id.clone_from(&job_id);
                            event("progress", &p)
                        }),
                    Ok(Note::Finished) | Err(RecvError::Lagged(_)) => None,
                    Err(RecvError::Closed) => return,
                },
            };
            let (ev, last) = match next {
                Some(ev) => (ev, false),
                None => match gw.redis.get_result(&key).await {
                    Ok(Some(mut r)) => {
                        r.job_id.clone_from(&job_id);
                        (event("result", &r), true)
                    }
                    _ => continue,
                },
            };
            // A client that stops reading blocks the send: the lifetime and a shutdown still end
            // the stream.
            let sent = tokio::select! {
                r = tx.send(ev) => r.is_ok(),
                _ = stopped(&mut stopping) => false,
                _ = &mut end => false,
            };
            if last || !sent {
                return;
            }
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
