//! The outside world, one module per system, each in the same shape: a `…Config`, a client
//! (`connect`), the runner trait it implements (`ImageSink`, `InputFetcher`, `JobSource`,
//! `Hooks`), and its failures as [`WorkerError::unavailable`] with the cause as `source`.
//!
//! - [`local`]: a JSONL job file in, a folder and a JSONL result file out (always built);
//! - [`amqp`]: RabbitMQ through lapin (jobs in, publishing with confirms);
//! - [`s3`]: images out, input images and model packages in;
//! - [`redis`]: results, progress, cancellation.
//!
//! The three network adapters and [`with_backoff`] are built with the `service` feature.

pub mod local;
pub mod secret;

#[cfg(feature = "service")]
pub mod amqp;
#[cfg(feature = "service")]
pub mod redis;
#[cfg(feature = "service")]
pub mod s3;

#[cfg(feature = "service")]
pub use retry::{jitter, with_backoff};

/// Installs rustls' aws-lc provider for the process (once; AMQP and Redis TLS use it).
#[cfg(feature = "service")]
pub(crate) fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

#[cfg(feature = "service")]
mod retry {
    use std::future::Future;
    use std::hash::{BuildHasher, Hasher};
    use std::time::Duration;

    use crate::error::{Result, WorkerError};

    /// A factor in [0.5, 1): "equal jitter", so that workers retrying the same outage spread out.
    pub fn jitter() -> f64 {
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        0.5 + (r >> 11) as f64 / (1u64 << 53) as f64 / 2.0
    }

    /// Retries `f` up to `tries` times: 0.2 s doubling up to 5 s between attempts, each wait
    /// scaled by a random factor in [0.5, 1). Returns the last error.
    pub async fn with_backoff<T, F, Fut>(what: &str, tries: u32, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(200);
        let mut last = None;
        for attempt in 1..=tries {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::warn!(attempt, tries, "{what}: {e}");
                    last = Some(e);
                }
            }
            if attempt < tries {
                tokio::time::sleep(delay.mul_f64(jitter())).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        Err(last.unwrap_or_else(|| WorkerError::Internal(format!("{what}: no attempt"))))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn jitter_stays_in_range_and_varies() {
            let xs: Vec<f64> = (0..64).map(|_| jitter()).collect();
            assert!(xs.iter().all(|x| (0.5..1.0).contains(x)));
            assert!(xs.iter().any(|x| (x - xs[0]).abs() > 1e-9));
        }

        #[tokio::test]
        async fn retries_until_success_then_stops() {
            let mut n = 0;
            let v = with_backoff("t", 5, || {
                n += 1;
                let fail = n < 3;
                async move {
                    if fail {
                        Err(WorkerError::unavailable("t", "down"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
            assert_eq!(v.ok(), Some(3));
            let e = with_backoff("t", 2, || async {
                Err::<(), _>(WorkerError::unavailable("x", "down"))
            })
            .await;
            assert!(e.is_err_and(|e| e.to_string().contains("down")));
        }
    }
}
