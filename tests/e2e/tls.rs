//! TLS that really encrypts: a worker on RabbitMQ's TLS listener (5671), a TLS-only Redis (6390)
//! and SeaweedFS's https S3 port (3901), all with the test CA that `scripts/services.sh` makes; and
//! TLS schemes pointed at plaintext ports, which must never connect (nor print the password).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use ddit_e2e::*;
use ddit_schemas::{JobResult, Status};
use serde_json::json;

fn ca_file() -> String {
    var("DDIT_TEST_TLS_CA_FILE", "/var/lib/ddit-tls/ca.pem")
}

/// The `ssl` column of the broker's connection whose client-given name is `name`
/// (`rabbitmqctl list_connections client_properties ssl`; the name is inside the properties).
fn connection_ssl(name: &str) -> Option<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "client_properties", "ssl"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let quoted = format!("\"{name}\"");
    text.lines()
        .filter(|l| l.contains(&quoted))
        .find_map(|l| Some(l.rsplit_once('\t')?.1.trim().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_rediss_and_https_s3_carry_a_job_and_the_broker_sees_tls() {
    let names = Names::new("tls");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let label = format!("tls-{}", names.id);
    let rediss = var("DDIT_TEST_REDISS_URL", "rediss://localhost:6390");
    let ca = ca_file();
    let extra = [
        "--amqp-url",
        &var(
            "DDIT_TEST_AMQPS_URL",
            "amqps://guest:guest@localhost:5671/%2f",
        ),
        "--redis-url",
        &rediss,
        "--s3-endpoint",
        &var("DDIT_TEST_S3_HTTPS_ENDPOINT", "https://localhost:3901"),
        "--tls-ca-file",
        &ca,
    ];
    let mut w = Worker::start(&names, &model, dir.path(), &label, &extra);
    w.wait_ready(Duration::from_secs(60));
    assert_eq!(
        connection_ssl(&label).as_deref(),
        Some("true"),
        "{}",
        w.log_text()
    );

    let job = json!({"job_id": "over-tls", "task": "generate",
        "params": {"prompt": "a red circle", "steps": 4, "seed": 3}});
    publish(&names, &[serde_json::to_vec(&job).unwrap()]).await;
    // The result is in the TLS-only Redis, read back over TLS with the same CA.
    let pem = std::fs::read_to_string(&ca).unwrap();
    let client = ddit_worker::adapters::redis::client(&rediss, Some(&pem)).unwrap();
    let mut r = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:result:over-tls", names.redis_prefix);
    let start = Instant::now();
    let stored: String = loop {
        let v: Option<String> = redis::AsyncCommands::get(&mut r, &key).await.unwrap();
        if let Some(v) = v {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            w.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let result: JobResult = serde_json::from_str(&stored).unwrap();
    assert_eq!(result.status, Status::Succeeded, "{:?}", result.error);
    assert_outputs_match(&[result]).await;
    let _: () = redis::AsyncCommands::del(&mut r, &key).await.unwrap();
    drop(w);
    cleanup(&names).await;
}

/// Waits a while and returns the worker's log, asserting it never became ready.
fn never_ready(w: &mut Worker, wait: Duration) -> String {
    let start = Instant::now();
    while start.elapsed() < wait {
        if w.child.try_wait().unwrap().is_some() {
            break;
        }
        let ready = http_get(w.port, "/readyz").is_some_and(|(code, _)| code == 200);
        assert!(!ready, "ready over a plaintext port:\n{}", w.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    w.log_text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_schemes_against_plaintext_ports_never_connect_nor_print_the_password() {
    let names = Names::new("plain");
    let dir = tempfile::tempdir().unwrap();
    let model = export_model(dir.path());
    let ca = ca_file();
    let secret = "pw-4711-never-logged";
    // With --tls-ca-file every URL must be TLS: the two that are not under test are right.
    let amqps_ok = var(
        "DDIT_TEST_AMQPS_URL",
        "amqps://guest:guest@localhost:5671/%2f",
    );
    let rediss_ok = var("DDIT_TEST_REDISS_URL", "rediss://localhost:6390");
    let https_ok = var("DDIT_TEST_S3_HTTPS_ENDPOINT", "https://localhost:3901");
    // amqps:// at the plaintext AMQP port.
    let label = format!("plain-{}", names.id);
    let amqps = format!("amqps://guest:{secret}@localhost:5672/%2f");
    let extra = [
        "--amqp-url",
        &amqps,
        "--redis-url",
        &rediss_ok,
        "--s3-endpoint",
        &https_ok,
        "--tls-ca-file",
        &ca,
    ];
    let mut w = Worker::start(&names, &model, dir.path(), &label, &extra);
    let log = never_ready(&mut w, Duration::from_secs(15));
    assert!(log.contains("amqp connect"), "{log}");
    assert!(!log.contains(secret), "the password is in the log:\n{log}");
    assert_eq!(connection_ssl(&label), None, "a connection was made");
    drop(w);
    // rediss:// at the plaintext Redis port.
    let rediss = format!("rediss://:{secret}@localhost:6379");
    let extra = [
        "--redis-url",
        &rediss,
        "--amqp-url",
        &amqps_ok,
        "--s3-endpoint",
        &https_ok,
        "--tls-ca-file",
        &ca,
    ];
    let mut w = Worker::start(&names, &model, dir.path(), "plain-redis", &extra);
    let log = never_ready(&mut w, Duration::from_secs(15));
    assert!(log.contains("redis"), "{log}");
    assert!(!log.contains(secret), "the password is in the log:\n{log}");
    drop(w);
    // https:// at the plaintext S3 port.
    let extra = [
        "--s3-endpoint",
        "https://localhost:3900",
        "--amqp-url",
        &amqps_ok,
        "--redis-url",
        &rediss_ok,
        "--tls-ca-file",
        &ca,
    ];
    let mut w = Worker::start(&names, &model, dir.path(), "plain-s3", &extra);
    let log = never_ready(&mut w, Duration::from_secs(15));
    assert!(log.contains("s3"), "{log}");
    drop(w);
    cleanup(&names).await;
}
