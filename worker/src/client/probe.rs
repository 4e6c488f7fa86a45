//! `ddit-worker probe`: an HTTP GET that succeeds on a 2xx answer. Container health checks use
//! it, so the runtime images need neither curl nor wget.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Result, WorkerError};

/// Splits `http://host:port/path` into (`host:port`, `/path`).
pub fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| WorkerError::Config {
            name: "url".into(),
            message: format!("`{url}` is not an http:// URL"),
        })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(WorkerError::Config {
            name: "url".into(),
            message: format!("`{url}` names no host"),
        });
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// GETs `url`; returns the status code and the body (at most 1 MiB).
pub fn get(url: &str, timeout: Duration) -> Result<(u16, String)> {
    let (authority, path) = split_url(url)?;
    let unavailable = |e: std::io::Error| WorkerError::unavailable(url, e);
    let addr = authority
        .to_socket_addrs()
        .map_err(unavailable)?
        .next()
        .ok_or_else(|| WorkerError::unavailable(url, "no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(unavailable)?;
    s.set_read_timeout(Some(timeout)).map_err(unavailable)?;
    s.set_write_timeout(Some(timeout)).map_err(unavailable)?;
    let host = authority.rsplit_once(':').map_or(&*authority, |(h, _)| h);
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(unavailable)?;
    let mut buf = Vec::new();
    s.take(1 << 20).read_to_end(&mut buf).map_err(unavailable)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| WorkerError::unavailable(url, "not an HTTP answer"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:9090/readyz").ok(),
            Some(("127.0.0.1:9090".into(), "/readyz".into()))
        );
        assert_eq!(
            split_url("http://worker").ok(),
            Some(("worker:80".into(), "/".into()))
        );
        assert!(split_url("https://x/").is_err());
        assert!(split_url("http:///x").is_err());
    }

    #[test]
    fn answers_from_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            for code in ["200 OK", "503 Service Unavailable"] {
                let (mut c, _) = l.accept().expect("accept");
                // Read the whole request before answering: closing a socket with unread
                // bytes resets the connection.
                let mut req = Vec::new();
                let mut buf = [0u8; 512];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = c.read(&mut buf).unwrap_or(0);
                    assert!(n > 0, "a request arrived");
                    req.extend_from_slice(&buf[..n]);
                }
                let _ = write!(c, "HTTP/1.1 {code}\r\nContent-Length: 5\r\n\r\nbody\n");
            }
        });
        let url = format!("http://{addr}/readyz");
        let ok = get(&url, Duration::from_secs(5)).expect("first");
        assert_eq!((ok.0, ok.1.trim()), (200, "body"));
        let bad = get(&url, Duration::from_secs(5)).expect("second");
        assert_eq!(bad.0, 503);
        t.join().expect("server");
        // Nothing listens there any more.
        assert!(get(&url, Duration::from_millis(500)).is_err());
    }
}
