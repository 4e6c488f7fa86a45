//! A `ddit-worker gateway` process on this test's queue and prefixes, and `curl` to talk to it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

use super::{free_port, http_get, service_env, var, worker_bin, Names};

pub struct Gateway {
    pub child: Child,
    pub port: u16,
    /// `--ops-listen`'s port: health, readiness, metrics.
    pub ops_port: u16,
    pub log: PathBuf,
    args: Vec<String>,
}

/// `ddit-worker ARGS`, its log appended to `log`.
fn spawn(args: &[String], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(worker_bin())
        .args(args)
        .envs(service_env())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// A tokens-file line for `name` holding `token`, with optional `:rpm:in_flight` limits.
pub fn token_line(name: &str, token: &str, limits: &str) -> String {
    let h = ddit_schemas::hex(&sha2::Sha256::digest(token.as_bytes()));
    format!("{name}:{h}{limits}\n")
}

impl Gateway {
    /// Starts a gateway with `tokens` (tokens-file text) and `extra` flags; waits until ready.
    pub fn start(names: &Names, dir: &Path, label: &str, tokens: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let ops_port = free_port();
        let log = dir.join(format!("{label}.log"));
        let tokens_file = dir.join(format!("{label}.tokens"));
        std::fs::write(&tokens_file, tokens).unwrap();
        let endpoint = var("DDIT_S3_ENDPOINT", "http://127.0.0.1:3900");
        let mut args = vec!["gateway".to_string()];
        args.extend(names.flags());
        let own = [
            "--delivery-limit",
            &names.delivery_limit.to_string(),
            "--s3-endpoint",
            &endpoint,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--ops-listen",
            &format!("127.0.0.1:{ops_port}"),
            "--log",
            "info",
            "--tokens-file",
            &tokens_file.display().to_string(),
        ];
        args.extend(own.map(String::from));
        args.extend(extra.iter().map(|a| a.to_string()));
        let child = spawn(&args, &log);
        let mut g = Self {
            child,
            port,
            ops_port,
            log,
            args,
        };
        g.wait_ready(Duration::from_secs(30));
        g
    }

    /// SIGTERM, then the exit status; panics if the gateway is still running after 10 s.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the gateway did not stop: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the gateway (it must exit 0), then starts it again on the same port and flags.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(status.success(), "{status}: {}", self.log_text());
        self.child = spawn(&self.args, &self.log);
        self.wait_ready(Duration::from_secs(30));
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("gateway exited ({status}): {}", self.log_text());
            }
            if http_get(self.ops_port, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("gateway not ready: {}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A URL on the ops address (`/healthz`, `/readyz`, `/metrics`).
    pub fn ops_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ops_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer as `curl -i` printed it.
#[derive(Debug)]
pub struct Http {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Http {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{} {e}: {}", self.status, self.text()))
    }
}

/// Runs `curl -sS -i` with `args`; the answer split into status, headers and body.
pub fn curl(args: &[&str]) -> Http {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "120"])
        .args(args)
        .output()
        .expect("curl (Debian package curl)");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Http {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The events of a Server-Sent Events body: (event name, data).
pub fn sse_events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            Some((name?, serde_json::from_str(&data).ok()?))
        })
        .collect()
}
