//! The command line: one module per subcommand, each with its `…Args` and the conversions into
//! the library's configs. [`engine`] holds the model and engine flags every model command shares.

#[cfg(feature = "service")]
mod dlq;
mod engine;
mod eval;
#[cfg(feature = "service")]
mod gateway;
mod limits;
mod local;
#[cfg(feature = "service")]
mod model_store;
mod parity;
#[cfg(feature = "service")]
mod serve;
#[cfg(feature = "service")]
mod submit;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ddit-worker",
    version,
    about = "Serve D-DiT: text to image, captioning and VQA"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Text to image: writes a PNG.
    Generate(local::GenerateArgs),
    /// Image to text: prints the caption.
    Caption(local::CaptionArgs),
    /// Visual question answering: prints the answer.
    Vqa(local::VqaArgs),
    /// Scores a model on an evaluation set.
    Eval {
        #[command(subcommand)]
        what: eval::EvalCmd,
    },
    /// The queue worker: jobs from AMQP, images to S3, results and progress to Redis.
    #[cfg(feature = "service")]
    Serve(Box<serve::ServeCmd>),
    /// The HTTP front door: jobs in over HTTP (validated, published with confirms), state, Server-Sent
    /// Events, outputs, cancel; a playground page at `/` and the OpenAPI document at `/openapi.json`.
    #[cfg(feature = "service")]
    Gateway(Box<gateway::GatewayArgs>),
    /// Bulk client: uploads a folder or JSONL manifest of inputs, publishes their jobs (publisher
    /// confirms, at most --ahead unanswered), collects results from Redis into one JSONL. Resumable.
    #[cfg(feature = "service")]
    Submit(Box<submit::SubmitArgs>),
    /// The dead-letter queue: `dlq replay` moves dead letters back to the work queue.
    #[cfg(feature = "service")]
    Dlq {
        #[command(subcommand)]
        what: dlq::DlqCmd,
    },
    /// Downloads a model package from S3 and verifies every file against its manifest (init containers).
    #[cfg(feature = "service")]
    FetchModel(model_store::FetchArgs),
    /// Verifies a model package folder and uploads it to S3 (manifest last).
    #[cfg(feature = "service")]
    PushModel(model_store::PushArgs),
    /// HTTP GET; exits 0 on a 2xx answer (container health checks).
    Probe(ProbeArgs),
    /// Runs a JSONL file of jobs; writes OUT/results.jsonl and OUT/{job_id}/{n}.png. Resumable.
    Batch(local::BatchArgs),
    /// Every segment on the same seeded inputs under `--providers` and `--against`: each one's
    /// largest absolute difference, and where `--against` placed the nodes.
    Parity(Box<parity::ParityArgs>),
}

#[derive(clap::Args)]
struct ProbeArgs {
    #[arg(long, default_value = "http://127.0.0.1:9090/readyz")]
    url: String,
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Generate(a) => local::generate(a),
        Cmd::Caption(a) => local::caption(a),
        Cmd::Vqa(a) => local::vqa(a),
        Cmd::Batch(a) => local::batch(a),
        Cmd::Parity(a) => parity::run(*a),
        Cmd::Eval { what } => eval::run(what),
        #[cfg(feature = "service")]
        Cmd::Serve(a) => serve::run(*a),
        #[cfg(feature = "service")]
        Cmd::Gateway(a) => gateway::run(*a),
        #[cfg(feature = "service")]
        Cmd::Submit(a) => submit::run(*a),
        #[cfg(feature = "service")]
        Cmd::Dlq { what } => dlq::run(what),
        #[cfg(feature = "service")]
        Cmd::FetchModel(a) => model_store::fetch(a),
        #[cfg(feature = "service")]
        Cmd::PushModel(a) => model_store::push(a),
        Cmd::Probe(a) => probe(a),
    }
}

fn probe(a: ProbeArgs) -> anyhow::Result<()> {
    let timeout = std::time::Duration::from_millis(a.timeout_ms.max(1));
    let (code, body) = ddit_worker::client::probe::get(&a.url, timeout)?;
    if !(200..300).contains(&code) {
        anyhow::bail!(
            "{}: HTTP {code} {}",
            a.url,
            body.lines().next().unwrap_or("")
        );
    }
    Ok(())
}

/// The one logging set-up of the local commands and clients (`serve` adds OpenTelemetry).
fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The one async runtime builder: two reactor threads (inference has threads of its own).
#[cfg(feature = "service")]
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
