//! S3: generated images out, input images in (from configured buckets only).
//!
//! Output keys are content-addressed, `{prefix}/{job_id}/{n}-{sha256}.png`: the bytes under a key
//! are always the bytes its name hashes to, so two copies of one job (a duplicate publish, a
//! redelivery) can never overwrite each other's images with different bytes, and the result that
//! wins `SET NX` names exactly the objects it describes. The copy that loses deletes the objects
//! the winner does not name ([`S3Store::delete_uris`]). Objects carry `image/png` and metadata
//! (seed, model hash, job id).

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use tokio::runtime::Handle;
use tracing::Instrument;

use crate::error::{Result, WorkerError};
use crate::runner::Png;
use crate::tasks::input::{decode_data_uri, Fetched, InputFetcher};

#[derive(Debug, Clone)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:3900`; empty for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub path_style: bool,
    /// Buckets input images may be read from (the output bucket is always allowed).
    pub input_buckets: Vec<String>,
    /// Largest input object read.
    pub max_input_bytes: usize,
    /// PEM of a private CA an https endpoint is verified against (besides the system's roots).
    pub ca_pem: Option<String>,
}

#[derive(Clone)]
pub struct S3Store {
    pub client: Client,
    pub cfg: S3Config,
}

/// An S3 failure (the message walks the SDK error's whole cause chain).
pub(crate) fn unavailable<E>(what: &str, e: E) -> WorkerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    WorkerError::unavailable(format!("s3 {what}"), e)
}

/// The SDK's https client (rustls, aws-lc) trusting the CA in `pem` besides the system's roots.
fn https_client(pem: &str) -> Result<aws_sdk_s3::config::SharedHttpClient> {
    use aws_smithy_http_client::tls;
    let trust = tls::TrustStore::default().with_pem_certificate(pem.as_bytes());
    let context = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| WorkerError::invalid("--tls-ca-file", e.to_string()))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(context)
        .build_https())
}

impl S3Store {
    /// Credentials come from the standard AWS variables (`AWS_ACCESS_KEY_ID`, ...).
    pub async fn connect(cfg: S3Config) -> Result<Self> {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(cfg.region.clone()));
        if let Some(ep) = &cfg.endpoint {
            loader = loader.endpoint_url(ep);
        }
        if let Some(pem) = &cfg.ca_pem {
            loader = loader.http_client(https_client(pem)?);
        }
        if let (Ok(id), Ok(secret)) = (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret,
                std::env::var("AWS_SESSION_TOKEN").ok(),
                None,
                "env",
            ));
        }
        let shared = loader.load().await;
        // Checksums only where the API requires them: file uploads then go as one signed body
        // rather than `aws-chunked` with a trailer, which not every S3 server accepts (Garage
        // answers "Invalid payload signature").
        // A stalled server is a timeout (transient), never a hung job: 5 s to connect, 30 s to
        // the first byte of an answer. Transfers themselves are not capped in time (model files
        // are large).
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .read_timeout(std::time::Duration::from_secs(30))
            .build();
        let conf = aws_sdk_s3::config::Builder::from(&shared)
            .timeout_config(timeouts)
            .force_path_style(cfg.path_style)
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .build();
        Ok(Self {
            client: Client::from_conf(conf),
            cfg,
        })
    }

    /// The key of output `index` of `job_id` whose PNG hashes to `sha256` (hex).
    pub fn key_for(&self, job_id: &str, index: u32, sha256: &str) -> String {
        let p = self.cfg.prefix.trim_matches('/');
        if p.is_empty() {
            format!("{job_id}/{index}-{sha256}.png")
        } else {
            format!("{p}/{job_id}/{index}-{sha256}.png")
        }
    }

    /// Deletes objects of this bucket by `s3://` URI (a losing copy's outputs); retried.
    pub async fn delete_uris(&self, uris: &[String]) -> Result<()> {
        let prefix = format!("s3://{}/", self.cfg.bucket);
        for key in uris.iter().filter_map(|u| u.strip_prefix(&prefix)) {
            crate::adapters::with_backoff("s3 delete_object", 4, || async {
                self.client
                    .delete_object()
                    .bucket(&self.cfg.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| unavailable("delete_object", e))?;
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        self.client.head_bucket().bucket(&self.cfg.bucket).send().await.map_err(|e| {
            // HEAD answers carry no error body: the status code is the reason.
            let status = e.raw_response().map(|r| r.status().as_u16());
            let why = match status {
                Some(403) => "HTTP 403 Forbidden: the access key or secret is wrong, or lacks access to the bucket".to_string(),
                Some(404) => "HTTP 404: the bucket does not exist".to_string(),
                Some(code) => format!("HTTP {code}"),
                None => "no response".to_string(),
            };
            WorkerError::unavailable(
                format!("s3 bucket {}", self.cfg.bucket),
                format!("{why} ({})", aws_sdk_s3::error::DisplayErrorContext(&e)),
            )
        })?;
        Ok(())
    }

    /// Uploads `body` to `key` of the bucket, retried with the service's backoff (4 attempts
    /// from 0.2 s, doubling); returns its `s3://` URI.
    pub async fn put(
        &self,
        key: &str,
        body: &[u8],
        content_type: &str,
        meta: &[(&str, String)],
    ) -> Result<String> {
        crate::adapters::with_backoff("s3 put_object", 4, || async {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.cfg.bucket)
                .key(key)
                .content_type(content_type)
                .body(ByteStream::from(body.to_vec()));
            for (k, v) in meta {
                req = req.metadata(*k, v);
            }
            req.send().await.map_err(|e| unavailable("put_object", e))?;
            Ok(format!("s3://{}/{key}", self.cfg.bucket))
        })
        .await
    }

    /// Uploads a local file to `s3://{bucket}/{key}`, retried with the service's backoff;
    /// returns its `s3://` URI. The body streams from disk (model files can be large).
    pub async fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &std::path::Path,
        content_type: Option<&str>,
    ) -> Result<String> {
        crate::adapters::with_backoff("s3 put_object", 4, || async {
            let body = ByteStream::from_path(path).await.map_err(|e| {
                WorkerError::io(
                    format!("reading {}", path.display()),
                    std::io::Error::other(e.to_string()),
                )
            })?;
            let mut req = self.client.put_object().bucket(bucket).key(key).body(body);
            if let Some(ct) = content_type {
                req = req.content_type(ct);
            }
            req.send()
                .await
                .map_err(|e| unavailable(&format!("put s3://{bucket}/{key}"), e))?;
            Ok(format!("s3://{bucket}/{key}"))
        })
        .await
    }

    /// Opens an object of an allowed bucket by `s3://` URI: its length (if sent) and its body.
    pub async fn open(&self, uri: &str) -> Result<(Option<i64>, ByteStream)> {
        let rest = uri.strip_prefix("s3://").unwrap_or(uri);
        let (bucket, key) = rest.split_once('/').ok_or_else(|| {
            WorkerError::invalid("params.image", format!("`{uri}` is not s3://bucket/key"))
        })?;
        if bucket != self.cfg.bucket && !self.cfg.input_buckets.iter().any(|b| b == bucket) {
            return Err(WorkerError::invalid(
                "params.image",
                format!("bucket `{bucket}` is not an allowed input bucket"),
            ));
        }
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| {
                let no_such_key = e.as_service_error().is_some_and(|s| s.is_no_such_key());
                let status = e.raw_response().map(|r| r.status().as_u16());
                // A 403 (an expired credential, a policy being rolled out) may pass: it is
                // transient, like a 5xx or a timeout; only a missing object is the job's fault.
                if no_such_key || status == Some(404) {
                    WorkerError::InputNotFound {
                        source_ref: uri.to_string(),
                    }
                } else {
                    unavailable("get_object", e)
                }
            })?;
        Ok((out.content_length(), out.body))
    }

    /// Reads an input object whole, refusing one larger than `max_input_bytes`.
    pub async fn get(&self, uri: &str) -> Result<Vec<u8>> {
        let (length, mut body) = self.open(uri).await?;
        let too_big = || WorkerError::InvalidInput {
            source_ref: uri.to_string(),
            message: format!("object is larger than {} bytes", self.cfg.max_input_bytes),
        };
        if length.unwrap_or(0) as usize > self.cfg.max_input_bytes {
            return Err(too_big());
        }
        // Read in chunks under the cap: a body without a Content-Length is never read unbounded.
        let mut bytes = Vec::new();
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| unavailable("get_object body", e))?
        {
            if bytes.len() + chunk.len() > self.cfg.max_input_bytes {
                return Err(too_big());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}

/// Input fetching and image output for inference threads (both on the service's runtime).
#[derive(Clone)]
pub struct S3Io {
    pub store: S3Store,
    pub handle: Handle,
    pub model_hash: String,
}

/// Data URIs are decoded in place; an `s3://` object is read by a task on the service's runtime,
/// which hands the bytes to `done` (the inference thread steps its other jobs meanwhile).
impl InputFetcher for S3Io {
    fn fetch(&self, uri: &str, done: Fetched) {
        if uri.starts_with("data:") {
            return done(decode_data_uri(uri));
        }
        if !uri.starts_with("s3://") {
            return done(Err(WorkerError::invalid(
                "params.image",
                "the service reads s3:// or data: images only",
            )));
        }
        let (store, uri) = (self.store.clone(), uri.to_string());
        let read = async move { done(store.get(&uri).await) };
        self.handle.spawn(read.instrument(tracing::Span::current()));
    }
}

impl S3Io {
    /// Stores one generated PNG under its content-addressed key, with its metadata; its URI.
    pub async fn put_png(&self, job_id: &str, index: u32, png: &Png, seed: u64) -> Result<String> {
        let key = self.store.key_for(job_id, index, &png.sha256);
        let meta = [
            ("seed", seed.to_string()),
            ("model-hash", self.model_hash.clone()),
            ("job-id", job_id.to_string()),
        ];
        self.store.put(&key, &png.bytes, "image/png", &meta).await
    }
}
