//! `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::breaker::Breaker;
use super::metrics::Metrics;
use crate::adapters::redis::ResultStore;
use crate::adapters::s3::S3Store;
use crate::error::{Result, WorkerError};

pub struct AppState {
    pub model_ready: AtomicBool,
    /// Live inference threads, and how many were started.
    pub threads_alive: Arc<AtomicUsize>,
    pub threads: usize,
    pub broker: std::sync::Mutex<Option<Arc<lapin::Connection>>>,
    pub redis: ResultStore,
    pub s3: S3Store,
    pub metrics: Arc<Metrics>,
    pub breaker: Arc<Breaker>,
}

/// Alive while every inference thread is (a dead one would strand the jobs handed to it) and the
/// circuit breaker is closed (an open one asks for a restart on a fresh device context).
async fn healthz(State(s): State<Arc<AppState>>) -> (StatusCode, String) {
    if let Some(p) = s.breaker.problem() {
        return (StatusCode::SERVICE_UNAVAILABLE, p + "\n");
    }
    let alive = s.threads_alive.load(Ordering::SeqCst);
    if alive < s.threads {
        tracing::error!(alive, started = s.threads, "an inference thread has died");
        let msg = format!("{alive} of {} inference threads alive\n", s.threads);
        return (StatusCode::SERVICE_UNAVAILABLE, msg);
    }
    (StatusCode::OK, "ok\n".into())
}

async fn readyz(State(s): State<Arc<AppState>>) -> (StatusCode, String) {
    let mut problems: Vec<String> = s.breaker.problem().into_iter().collect();
    if !s.model_ready.load(Ordering::SeqCst) {
        problems.push("model not loaded".to_string());
    }
    let broker_ok = s
        .broker
        .lock()
        .ok()
        .and_then(|c| c.as_ref().map(|c| c.status().connected()))
        .unwrap_or(false);
    if !broker_ok {
        problems.push("broker not connected".to_string());
    }
    if let Err(e) = s.redis.ping().await {
        problems.push(e.to_string());
    }
    if let Err(e) = s.s3.ping().await {
        problems.push(e.to_string());
    }
    readiness(&problems)
}

/// The `/readyz` answer (the worker's and the gateway's): 200, or 503 listing what is wrong.
pub fn readiness(problems: &[String]) -> (StatusCode, String) {
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        tracing::warn!("not ready: {}", problems.join("; "));
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

async fn metrics(
    State(s): State<Arc<AppState>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Binds `addr` and serves until the runtime stops. Returns the bound address.
pub async fn spawn(addr: SocketAddr, state: Arc<AppState>) -> Result<SocketAddr> {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| WorkerError::Config {
            name: "listen".into(),
            message: format!("{addr}: {e}"),
        })?;
    let bound = listener
        .local_addr()
        .map_err(|e| WorkerError::io("listen address", e))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("http server: {e}");
        }
    });
    Ok(bound)
}
