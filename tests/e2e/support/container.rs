//! The worker image run as the Kubernetes manifests run it, with podman.
//!
//! What each container gets (user, arguments, settings, mounts, probes, grace period) is read from
//! the rendered manifests by `tools/deploy/container_spec.py`, so the test cannot drift from them.
//! Each container has its own network namespace (slirp4netns), as a pod has, so the manifests'
//! ports are used unchanged; the loopback services' TLS listeners are reached at the host's
//! address there, 10.0.2.2, checked against the test CA mounted where the manifests mount theirs.
//! Only the connection settings (the Secret's, and the test's own queue and prefixes) are the
//! test's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{bucket, free_port, var, workspace, Names};

/// The host's loopback as a slirp4netns container sees it.
pub const HOST: &str = "10.0.2.2";

/// `podman` with Debian's runc (crun fails on this kernel's hybrid cgroups), as scripts/images.sh.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// `podman run --rm` with the explicit rlimits runc needs here.
pub fn podman_run() -> Command {
    let mut c = podman();
    c.args([
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
    ]);
    c
}

/// The image `scripts/images.sh` last built from this tree (its id, from `.ddit/images/`), or
/// `$DDIT_IMAGE`: never a tag another tree on the machine may have moved.
pub fn image() -> String {
    built_image("DDIT_IMAGE", "cpu")
}

pub fn gpu_image() -> String {
    built_image("DDIT_GPU_IMAGE", "gpu-standin")
}

fn built_image(env: &str, kind: &str) -> String {
    if let Ok(i) = std::env::var(env) {
        return i;
    }
    let file = workspace().join(format!(".ddit/images/{kind}.id"));
    let id = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/images.sh first)", file.display()));
    id.trim().to_string()
}

/// The manifests' containers by name (`worker`, `fetch-model`, `gateway`).
pub fn manifest_specs() -> BTreeMap<String, Value> {
    let root = workspace();
    let venv = root.join(".ddit/deploy-tools/venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let out = Command::new(python)
        .arg(root.join("tools/deploy/container_spec.py"))
        .arg(root.join("deploy/k8s/base"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The Secret's settings, pointed at the loopback services, plus this test's queue and prefixes.
pub fn test_settings(names: &Names, model_url: &str) -> Vec<(String, String)> {
    // TLS, as the manifests' Secret requires; the test certificate names 10.0.2.2 too.
    let tls = |name, default: &str| var(name, default).replace("localhost", HOST);
    let s3 = tls("DDIT_TEST_S3_HTTPS_ENDPOINT", "https://localhost:3901");
    let amqp = tls(
        "DDIT_TEST_AMQPS_URL",
        "amqps://guest:guest@localhost:5671/%2f",
    );
    let redis = tls("DDIT_TEST_REDISS_URL", "rediss://localhost:6390");
    // The Secret's credentials; the region is the ConfigMap's DDIT_S3_REGION.
    let mut out: Vec<(String, String)> = super::service_env()
        .into_iter()
        .filter(|(k, _)| k.starts_with("AWS_") && k != "AWS_REGION")
        .collect();
    out.extend(
        [
            ("DDIT_AMQP_URL", amqp.as_str()),
            ("DDIT_REDIS_URL", redis.as_str()),
            ("DDIT_S3_ENDPOINT", s3.as_str()),
            ("DDIT_S3_BUCKET", &bucket()),
            // SeaweedFS at an address has no per-bucket host names.
            ("DDIT_S3_PATH_STYLE", "true"),
            ("DDIT_MODEL_URL", model_url),
            ("DDIT_QUEUE", &names.queue),
            ("DDIT_DEAD_LETTER_EXCHANGE", &names.dlx),
            ("DDIT_DEAD_LETTER_QUEUE", &names.dlq),
            ("DDIT_REDIS_PREFIX", &names.redis_prefix),
            ("DDIT_S3_PREFIX", &names.s3_prefix),
            // No collector here: the manifests' endpoint is a cluster address.
            ("DDIT_OTLP_ENDPOINT", ""),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    out
}

/// One container started from a manifest's spec.
pub struct Pod {
    pub name: String,
    pub spec: Value,
    /// Host ports of the manifest's named ports.
    pub ports: BTreeMap<String, u16>,
}

impl Pod {
    /// `podman run` for `spec` with `volumes` (volume name → host folder) and `settings` (on top
    /// of the manifest's env). `detach`: run in the background, else wait and return its output.
    pub fn run(
        name: &str,
        spec: &Value,
        volumes: &BTreeMap<String, PathBuf>,
        settings: &[(String, String)],
        detach: bool,
    ) -> (Self, Option<Output>) {
        let mut c = podman();
        c.args([
            "run",
            "--name",
            name,
            "--network",
            "slirp4netns:allow_host_loopback=true",
        ]);
        c.args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
        ]);
        c.args(security_flags(spec));
        if let Some(m) = spec["memory_limit"].as_str() {
            c.arg(format!("--memory={}", podman_size(m)));
        }
        for m in spec["mounts"].as_array().unwrap() {
            let host = &volumes[m["volume"].as_str().unwrap()];
            let ro = if m["read_only"].as_bool().unwrap() {
                ":ro"
            } else {
                ""
            };
            c.args([
                "-v",
                &format!("{}:{}{ro}", host.display(), m["path"].as_str().unwrap()),
            ]);
        }
        for (k, v) in env_of(spec, settings, name) {
            c.args(["-e", &format!("{k}={v}")]);
        }
        let mut ports = BTreeMap::new();
        for (pname, port) in spec["ports"].as_object().unwrap() {
            let host = free_port();
            c.args(["-p", &format!("127.0.0.1:{host}:{port}")]);
            ports.insert(pname.clone(), host);
        }
        if detach {
            c.arg("-d");
        } else {
            c.arg("--rm");
        }
        c.arg(image());
        c.args(
            spec["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap()),
        );
        let out = c.stdin(Stdio::null()).output().unwrap();
        let pod = Self {
            name: name.into(),
            spec: spec.clone(),
            ports,
        };
        if detach {
            assert!(
                out.status.success(),
                "podman run {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (pod, None)
        } else {
            (pod, Some(out))
        }
    }

    /// Whether the manifest's `kind` probe (startup, liveness, readiness) answers 200 within
    /// the manifest's `timeoutSeconds`.
    pub fn probe_ok(&self, kind: &str) -> bool {
        let probe = &self.spec["probes"][kind];
        let port = probe["port"].as_u64().unwrap();
        let (pname, _) = self.spec["ports"]
            .as_object()
            .unwrap()
            .iter()
            .find(|(_, p)| p.as_u64() == Some(port))
            .unwrap();
        let url = format!(
            "http://127.0.0.1:{}{}",
            self.ports[pname],
            probe["path"].as_str().unwrap()
        );
        let timeout = Duration::from_secs(probe["timeout"].as_u64().unwrap());
        ddit_worker::client::probe::get(&url, timeout).is_ok_and(|(code, _)| code == 200)
    }

    /// Waits for the manifest's `kind` probe to pass, within the time the manifest gives it
    /// (period × failures).
    pub fn wait_probe(&self, kind: &str) {
        let probe = &self.spec["probes"][kind];
        let budget = probe["period"].as_u64().unwrap() * probe["failures"].as_u64().unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(budget) {
            if self.probe_ok(kind) {
                return;
            }
            assert!(self.running(), "{} exited: {}", self.name, self.logs());
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("{}: {kind} probe never passed: {}", self.name, self.logs());
    }

    pub fn port(&self, name: &str) -> u16 {
        self.ports[name]
    }

    pub fn running(&self) -> bool {
        let out = podman()
            .args(["inspect", "--format", "{{.State.Running}}", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    pub fn logs(&self) -> String {
        let out = podman().args(["logs", &self.name]).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `podman kill --signal TERM`, then waits up to the manifest's grace period: the exit code,
    /// or None when the container was still running then.
    pub fn sigterm_and_wait(&self) -> Option<i64> {
        let ok = podman()
            .args(["kill", "--signal", "TERM", &self.name])
            .status()
            .unwrap();
        assert!(ok.success());
        let grace = Duration::from_secs(self.spec["grace_seconds"].as_u64().unwrap());
        let start = Instant::now();
        while start.elapsed() < grace {
            if !self.running() {
                let out = podman()
                    .args(["inspect", "--format", "{{.State.ExitCode}}", &self.name])
                    .output()
                    .unwrap();
                return String::from_utf8_lossy(&out.stdout).trim().parse().ok();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// The manifest's securityContext as podman flags.
fn security_flags(spec: &Value) -> Vec<String> {
    let mut f = vec![format!("--user={}:{}", spec["user"], spec["group"])];
    if let Some(g) = spec["fs_group"].as_u64() {
        f.push(format!("--group-add={g}"));
    }
    if spec["read_only_root"].as_bool().unwrap() {
        // Without podman's writable /tmp, /var/tmp and /run: only the manifests' volumes.
        f.push("--read-only".into());
        f.push("--read-only-tmpfs=false".into());
    }
    if spec["drop_all_caps"].as_bool().unwrap() {
        f.push("--cap-drop=ALL".into());
    }
    if spec["no_new_privileges"].as_bool().unwrap() {
        f.push("--security-opt=no-new-privileges".into());
    }
    f
}

/// The manifest's env, then `settings` over it; a `valueFrom` (the pod's name) becomes `name`.
fn env_of(spec: &Value, settings: &[(String, String)], name: &str) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = spec["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let v = p[1].as_str().unwrap_or(name);
            (p[0].as_str().unwrap().to_string(), v.to_string())
        })
        .collect();
    for s in spec["secret_env"].as_array().unwrap() {
        let k = s.as_str().unwrap();
        assert!(
            settings.iter().any(|(n, _)| n == k) || k == "RABBITMQ_MANAGEMENT_URL",
            "the manifests' Secret holds {k}, which the test does not provide"
        );
    }
    for (k, v) in settings {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().filter(|(_, v)| !v.is_empty()).collect()
}

/// A Kubernetes quantity (`512Mi`, `4Gi`) as podman's `--memory`.
fn podman_size(q: &str) -> String {
    let units = [("Ki", "k"), ("Mi", "m"), ("Gi", "g")];
    let (n, unit) = units
        .iter()
        .find_map(|(k, p)| q.strip_suffix(k).map(|n| (n, *p)))
        .unwrap_or_else(|| panic!("memory limit {q}: not Ki, Mi or Gi"));
    format!("{n}{unit}")
}

/// A host folder for a volume, owned by the pod's fsGroup as Kubernetes would make it.
pub fn volume(dir: &Path, name: &str, spec: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(&path).unwrap();
    let gid = spec["fs_group"]
        .as_u64()
        .or(spec["group"].as_u64())
        .unwrap();
    let uid = spec["user"].as_u64().unwrap();
    let ok = Command::new("chown")
        .args(["-R", &format!("{uid}:{gid}"), path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
    path
}
