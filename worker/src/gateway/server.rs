//! The gateway's HTTP server: hyper's HTTP/1 under a bounded number of connections, with a
//! deadline for a request's headers (a half-sent header does not hold a connection) and one for
//! the handler (the body included), and a graceful stop.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tower_http::timeout::TimeoutLayer;

/// Bounds on what one client's connections can hold.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// The whole header of a request must arrive within this (else the connection is closed).
    pub header_timeout: Duration,
    /// A handler, its body's reading included, must answer within this (else 408). An event
    /// stream or a streamed output is answered at once; its body is not bounded by this.
    pub request_timeout: Duration,
    /// Open connections; more wait to be accepted.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `stop` turns true, then finishes the requests in progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = app.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        limits.request_timeout,
    ));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            a = async {
                let slot = slots.clone().acquire_owned().await;
                (slot, listener.accept().await)
            } => a,
        };
        let (Ok(slot), accepted) = accepted else {
            break;
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors and the like: wait, the connections in hand will close.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    graceful.shutdown().await;
}
