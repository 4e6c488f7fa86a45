//! `ddit-worker fetch-model|push-model`: model packages in S3.

use std::path::PathBuf;

use clap::Args;
use ddit_worker::adapters::s3::{S3Config, S3Store};
use ddit_worker::client::model_store::{self, parse_s3_url, Fetched};

use super::serve::{S3ConnArgs, TlsArgs};

#[derive(Args)]
pub struct FetchArgs {
    /// s3://bucket/prefix holding manifest.json and the files it lists.
    #[arg(long = "from", env = "DDIT_MODEL_URL")]
    from: String,
    /// Destination folder (replaced only once the new package verifies).
    #[arg(long, env = "DDIT_MODEL")]
    out: PathBuf,
    #[command(flatten)]
    s3: S3ConnArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args)]
pub struct PushArgs {
    /// The package folder (made by ddit-export).
    #[arg(long, env = "DDIT_MODEL")]
    model: PathBuf,
    /// s3://bucket/prefix to upload to.
    #[arg(long, env = "DDIT_MODEL_URL")]
    to: String,
    #[command(flatten)]
    s3: S3ConnArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Runs `f` with an S3 client for the bucket of `url` (`s3://bucket/prefix`).
fn with_store<T, F, Fut>(url: &str, s3: S3ConnArgs, tls: &TlsArgs, f: F) -> anyhow::Result<T>
where
    F: FnOnce(S3Store) -> Fut,
    Fut: std::future::Future<Output = ddit_worker::Result<T>>,
{
    super::init_logging("warn");
    let (bucket, _) = parse_s3_url(url)?;
    let cfg = S3Config {
        ca_pem: tls.ca_pem_for(&[s3.tls_use()])?,
        ..s3.config(bucket, String::new(), 0)
    };
    let out = super::runtime()?.block_on(async {
        let store = S3Store::connect(cfg).await?;
        f(store).await
    })?;
    Ok(out)
}

pub fn fetch(a: FetchArgs) -> anyhow::Result<()> {
    let (url, dest) = (a.from.clone(), a.out.clone());
    let fetched = with_store(&a.from, a.s3, &a.tls, |st| async move {
        model_store::fetch(&st, &url, &dest).await
    })?;
    match fetched {
        Fetched::Downloaded { files, hash } => eprintln!(
            "fetched {} into {}: {files} files verified, model hash {hash}",
            a.from,
            a.out.display()
        ),
        Fetched::AlreadyPresent { hash } => eprintln!(
            "{} already holds model {hash}; nothing downloaded",
            a.out.display()
        ),
    }
    Ok(())
}

pub fn push(a: PushArgs) -> anyhow::Result<()> {
    let (url, dir) = (a.to.clone(), a.model.clone());
    let hash = with_store(&a.to, a.s3, &a.tls, |st| async move {
        model_store::push(&st, &dir, &url).await
    })?;
    eprintln!(
        "pushed {} to {}: model hash {hash}",
        a.model.display(),
        a.to
    );
    Ok(())
}
