//! Model packages in S3: `push-model` uploads a verified package folder, `fetch-model` downloads
//! one and verifies every file against its manifest before it becomes visible (the Kubernetes
//! init container runs `fetch-model`).
//!
//! Layout: `s3://{bucket}/{prefix}/manifest.json` plus every file the manifest lists, under the
//! same prefix. Fetching validates the manifest first (`Manifest::validate`: version, paths,
//! role contracts, block coverage, package hash), writes into `{out}.partial/` checking every
//! file's size and sha256 while it streams, and only then renames it to `{out}`. A folder already holding the same verified package (same model
//! hash) is kept as it is, so a restarted pod does not download again.

use std::io::Write;
use std::path::{Path, PathBuf};

use ddit_schemas::{Manifest, MANIFEST_FILE};
use sha2::{Digest, Sha256};

use crate::adapters::s3::{self, S3Store};
use crate::engine::Package;
use crate::error::{Result, WorkerError};

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

/// Uploads a package folder after verifying it. Files first, the manifest last, so a reader never
/// sees a manifest whose files are not there yet. Returns the model hash.
pub async fn push(store: &S3Store, dir: &Path, url: &str) -> Result<String> {
    let pkg = Package::open(dir)?;
    let (bucket, prefix) = parse_s3_url(url)?;
    let mut names: Vec<String> = pkg.manifest.files().map(|f| f.path.clone()).collect();
    names.push(MANIFEST_FILE.into());
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
        .map_err(|e| s3::unavailable(&format!("get s3://{bucket}/{k}"), e))?;
    let mut body = out.body;
    let mut file = std::fs::File::create(path)
        .map_err(|e| WorkerError::io(format!("creating {}", path.display()), e))?;
    let mut hash = Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| s3::unavailable(&format!("read s3://{bucket}/{k}"), e))?
    {
        hash.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk)
            .map_err(|e| WorkerError::io(format!("writing {}", path.display()), e))?;
    }
    file.sync_all()
        .map_err(|e| WorkerError::io(format!("syncing {}", path.display()), e))?;
    if let Some((sha, size)) = expect {
        let got = ddit_schemas::hex(&hash.finalize());
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
    let mkey = key(&prefix, MANIFEST_FILE);
    let mpath = partial.join(MANIFEST_FILE);
    download_verified(store, &bucket, &mkey, &mpath, None).await?;
    let text = std::fs::read_to_string(&mpath)
        .map_err(|e| WorkerError::io(format!("reading {}", mpath.display()), e))?;
    let manifest = Manifest::parse(&text)
        .and_then(|m| m.validate().map(|()| m))
        .map_err(|message| WorkerError::Package {
            path: format!("s3://{bucket}/{mkey}"),
            message,
        })?;
    if out.join(MANIFEST_FILE).exists() {
        if let Ok(have) = Package::open(out) {
            if have.manifest.model.hash == manifest.model.hash {
                std::fs::remove_dir_all(&partial).ok();
                return Ok(Fetched::AlreadyPresent {
                    hash: manifest.model.hash,
                });
            }
        }
    }
    // Every listed file is checked (size, sha256) as it streams in; the manifest's own rules
    // were checked above, so the folder is a verified package once the loop ends.
    for f in manifest.files() {
        download_verified(
            store,
            &bucket,
            &key(&prefix, &f.path),
            &partial.join(&f.path),
            Some((&f.sha256, f.bytes)),
        )
        .await?;
    }
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
        files: manifest.files().count() + 1,
        hash: manifest.model.hash,
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
