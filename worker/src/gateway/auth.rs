//! Bearer tokens and each client's limits (enforced by [`super::limits`]).
//!
//! The tokens file holds one client per line, `name:sha256-hex-of-token`, optionally followed by
//! `:requests-per-minute` and `:jobs-in-flight` to override the gateway's defaults for that
//! client (`0` is unlimited). Blank lines and `#` comments are skipped. No token is stored in
//! clear: a request's token is hashed and looked up.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};

use super::error::ApiError;
use super::Gateway;

/// The limits of one client (`0`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute, over all of the gateway's replicas (a sliding window in Redis).
    pub requests_per_minute: u64,
    /// Accepted jobs without a result yet.
    pub jobs_in_flight: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    rpm: Option<u64>,
    in_flight: Option<usize>,
}

/// The clients allowed in, by the sha256 of their token.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<String, Entry>,
}

impl Tokens {
    /// Parses a tokens file's text; an error names the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        // A name may hold several tokens (rotation with overlap), all with the same limits.
        let mut names: HashMap<String, (Option<u64>, Option<usize>)> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |m: &str| format!("line {}: {m}", i + 1);
            let mut parts = line.split(':');
            let name = parts.next().unwrap_or_default();
            let hash = parts.next().unwrap_or_default().to_ascii_lowercase();
            let num = |s: Option<&str>, what: &str| -> Result<Option<u64>, String> {
                s.map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| at(&format!("{what} `{v}` is not a number")))
                })
                .transpose()
            };
            let rpm = num(parts.next(), "requests per minute")?;
            let in_flight = num(parts.next(), "jobs in flight")?.map(|n| n as usize);
            if parts.next().is_some() {
                return Err(at("more than four `:`-separated fields"));
            }
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !name_ok {
                return Err(at(
                    "the client name must be 1 to 64 letters, digits, `-`, `_` or `.`",
                ));
            }
            if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(at(
                    "expected the token's sha256 as 64 hex digits (never the token)",
                ));
            }
            let limits = *names.entry(name.to_string()).or_insert((rpm, in_flight));
            if limits != (rpm, in_flight) {
                return Err(at(&format!(
                    "client `{name}` appears with other limits on an earlier line"
                )));
            }
            let e = Entry {
                name: name.to_string(),
                rpm,
                in_flight,
            };
            if by_hash.insert(hash, e).is_some() {
                return Err(at("the same token hash appears twice"));
            }
        }
        Ok(Self { by_hash })
    }

    /// The tokens (a client rotating its token holds two).
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The client holding `token`, with its limits (the defaults where its line sets none).
    fn find(&self, token: &str, defaults: Limits) -> Option<Client> {
        let e = self
            .by_hash
            .get(&super::submit::sha256_hex(token.as_bytes()))?;
        Some(Client {
            name: e.name.clone(),
            limits: Limits {
                requests_per_minute: e.rpm.unwrap_or(defaults.requests_per_minute),
                jobs_in_flight: e.in_flight.unwrap_or(defaults.jobs_in_flight),
            },
        })
    }
}

/// An authenticated client within its request rate: the extractor every `/v1` route takes.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    pub limits: Limits,
}

/// Where every gateway job id lives: `gw:{client}:{id}`. A client name has no `:`, so no id a
/// client chooses reaches another client's space, nor a job published straight to the broker
/// (whose ids a publisher must not start with `gw:`).
pub const SCOPE: &str = "gw:";

impl Client {
    /// The id under which the job `id` of this client lives in every key it touches (queue
    /// message, result, progress, cancel, S3 outputs).
    pub fn scoped(&self, id: &str) -> String {
        format!("{SCOPE}{}:{id}", self.name)
    }

    /// The longest id this client may choose (the scoped id stays within the job schema's 128).
    pub fn max_id_len(&self) -> usize {
        128 - SCOPE.len() - self.name.len() - 1
    }
}

impl FromRequestParts<Arc<Gateway>> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let client = token
            .and_then(|t| gw.cfg.tokens.find(t, gw.cfg.limits))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid `Authorization: Bearer <token>` is required",
                )
            })?;
        // Every request counts, a refused or invalid one too; a submission is counted by its
        // handler while its body is read.
        if parts.method != Method::POST {
            super::limits::admit(gw, &client).await?;
        }
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"

    #[test]
    fn a_token_is_found_by_its_hash_with_its_limits() {
        let d = Limits {
            requests_per_minute: 60,
            jobs_in_flight: 4,
        };
        let t = Tokens::parse(&format!(
            "# clients\n\nalice:{H}\nbob:{}:5:0\n",
            "a".repeat(64)
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.len(), 2);
        let alice = t.find("test", d).unwrap_or_else(|| panic!("alice"));
        assert_eq!((alice.name.as_str(), alice.limits), ("alice", d));
        assert!(t.find("TEST", d).is_none() && t.find(H, d).is_none());
        // Rotation: a second token for the same client, both valid until the old line goes.
        let both = Tokens::parse(&format!("alice:{H}:5\nalice:{}:5\n", "c".repeat(64)))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(both.len(), 2);
        let a = both.find("test", d).map(|c| c.name);
        assert_eq!(a.as_deref(), Some("alice"));
    }

    #[test]
    fn a_bad_line_is_named() {
        for (text, says) in [
            ("alice:test", "line 1: expected the token's sha256"),
            (&format!("\nal ice:{H}") as &str, "line 2: the client name"),
            (
                &format!("a:{H}:5\na:{}", "b".repeat(64)),
                "line 2: client `a` appears with other limits",
            ),
            (&format!("a:{H}\nb:{H}"), "line 2: the same token hash"),
            (&format!("a:{H}:x"), "requests per minute `x`"),
            (&format!("a:{H}:1:2:3"), "more than four"),
        ] {
            let e = Tokens::parse(text).err().unwrap_or_default();
            assert!(e.contains(says), "{text}: {e}");
        }
    }
}
