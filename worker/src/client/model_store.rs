//! Model packages in S3: `push-model` uploads a verified package folder, `fetch-model` downloads
//! one and verifies every file against its manifest before it becomes visible (the Kubernetes
//! init container runs `fetch-model`).
//!
//! Layout: `s3://{bucket}/{prefix}/manifest.json` plus every file the manifest lists, under the
//! same prefix. Fetching writes into `{out}.partial/`, checks sizes and sha256 while streaming,
//! re-opens the result as a [`Package`] (full verification: version, hashes, role contracts) and
//! only then renames it to `{out}`. A folder already holding the same verified package (same model
//! hash) is kept as it is, so a restarted pod does not download again.

use std::io::Write;
use std::path::{Path, PathBuf};

use ddit_schemas::Manifest;
use sha2::{Digest, Sha256};

use crate::engine::Package;
use crate::error::{Result, WorkerError};
use crate::service::s3::S3Store;

/// `s3://bucket/prefix` split into bucket and prefix (no trailing slash).
pub fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| WorkerError::Config {
            name: "s3 url".into(),
            message: format!("`{url}` does not start with s3://"),
        })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(WorkerError::Config {
            name: "s3 url".into(),
            message: format!("`{url}` names no bucket"),
        });
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

fn unavailable(what: String, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Unavailable {
        what,
        message: e.to_string(),
    }
}

/// Uploads a package folder after verifying it. Files first, the manifest last, so a reader never
/// sees a manifest whose files are not there yet. Returns the model hash.
pub async fn push(store: &S3Store, dir: &Path, url: &str) -> Result<String> {
    let pkg = Package::open(dir)?;
    let (bucket, prefix) = parse_s3_url(url)?;
    let mut names: Vec<String> = pkg.manifest.files().map(|f| f.path.clone()).collect();
    names.push("manifest.json".into());
    for name in names {
        store
            .put_file(&bucket, &key(&prefix, &name), &dir.join(&name), None)
            .await?;
    }
    Ok(pkg.manifest.model.hash)
}

/// Downloads one object into `path`, checking its size and sha256 on the way.
async fn download_verified(
    store: &S3Store,
    bucket: &str,
    k: &str,
    path: &Path,
    expect: Option<(&str, u64)>,
) -> Result<()> {
    let out = store
        .client
        .get_object()
        .bucket(bucket)
        .key(k)
        .send()
        .await
        .map_err(|e| {
            unavailable(
                format!("s3 get s3://{bucket}/{k}"),
                aws_sdk_s3::error::DisplayErrorContext(&e),
            )
        })?;
    let mut body = out.body;
    let mut file = std::fs::File::create(path)
        .map_err(|e| WorkerError::io(format!("creating {}", path.display()), e))?;
    let mut hash = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| unavailable(format!("s3 read s3://{bucket}/{k}"), e))?
    {
        hash.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk)
            .map_err(|e| WorkerError::io(format!("writing {}", path.display()), e))?;
    }
    file.sync_all()
        .map_err(|e| WorkerError::io(format!("syncing {}", path.display()), e))?;
    if let Some((sha, size)) = expect {
        let got = crate::engine::hex(&hash.finalize());
        if bytes != size || got != sha {
            return Err(WorkerError::Package {
                path: format!("s3://{bucket}/{k}"),
                message: format!(
                    "manifest says {size} bytes with sha256 {sha}; downloaded {bytes} bytes with sha256 {got}"
                ),
            });
        }
    }
    Ok(())
}

/// What [`fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// Downloaded and verified this many files.
    Downloaded { files: usize, hash: String },
    /// `out` already held this verified package.
    AlreadyPresent { hash: String },
}

/// Downloads the package at `url` into `out` (see the module doc).
pub async fn fetch(store: &S3Store, url: &str, out: &Path) -> Result<Fetched> {
    let (bucket, prefix) = parse_s3_url(url)?;
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .map_err(|e| WorkerError::io(format!("removing {}", partial.display()), e))?;
    }
    std::fs::create_dir_all(&partial)
        .map_err(|e| WorkerError::io(format!("creating {}", partial.display()), e))?;
    let mpath = partial.join("manifest.json");
    download_verified(store, &bucket, &key(&prefix, "manifest.json"), &mpath, None).await?;
    let text = std::fs::read_to_string(&mpath)
        .map_err(|e| WorkerError::io(format!("reading {}", mpath.display()), e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| WorkerError::Package {
        path: format!("s3://{bucket}/{}", key(&prefix, "manifest.json")),
        message: format!("invalid manifest: {e}"),
    })?;
    if out.join("manifest.json").exists() {
        if let Ok(have) = Package::open(out) {
            if have.manifest.model.hash == manifest.model.hash {
                std::fs::remove_dir_all(&partial).ok();
                return Ok(Fetched::AlreadyPresent {
                    hash: manifest.model.hash,
                });
            }
        }
    }
    let mut files = 0;
    for f in manifest.files() {
        if f.path.contains('/') || f.path.contains('\\') || f.path.contains("..") {
            return Err(WorkerError::Package {
                path: format!("s3://{bucket}/{}", key(&prefix, "manifest.json")),
                message: format!("file `{}` leaves the package", f.path),
            });
        }
        download_verified(
            store,
            &bucket,
            &key(&prefix, &f.path),
            &partial.join(&f.path),
            Some((&f.sha256, f.bytes)),
        )
        .await?;
        files += 1;
    }
    let pkg = Package::open(&partial)?;
    if out.exists() {
        std::fs::remove_dir_all(out)
            .map_err(|e| WorkerError::io(format!("replacing {}", out.display()), e))?;
    }
    std::fs::rename(&partial, out).map_err(|e| {
        WorkerError::io(
            format!("renaming {} to {}", partial.display(), out.display()),
            e,
        )
    })?;
    Ok(Fetched::Downloaded {
        files: files + 1,
        hash: pkg.manifest.model.hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_s3_url("s3://models/ddit/v1/").ok(),
            Some(("models".into(), "ddit/v1".into()))
        );
        assert_eq!(
            parse_s3_url("s3://models").ok(),
            Some(("models".into(), String::new()))
        );
        assert!(parse_s3_url("http://x/y").is_err());
        assert!(parse_s3_url("s3:///y").is_err());
        assert_eq!(key("", "manifest.json"), "manifest.json");
        assert_eq!(key("a/b", "x.onnx"), "a/b/x.onnx");
    }
}
