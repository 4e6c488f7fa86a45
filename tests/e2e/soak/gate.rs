//! The workers' only way to S3: a TCP relay on a spare port that the soak can shut for an
//! exact time. Shut, it drops every open connection and stops listening, so a worker's
//! requests fail as they do against a stopped server (connection refused); open, it listens
//! on the same port again. Stopping the shared SeaweedFS instead takes ~25 s to stop and
//! 15-20 s to start (the outage would be half as long again as asked) and would break any other
//! test using it meanwhile.

use std::io::ErrorKind;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddit_e2e::*;

pub struct Gate {
    pub endpoint: String,
    open: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    });
}

fn listen(port: u16) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            l.set_nonblocking(true).unwrap();
            return l;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot listen on {port} again");
}

impl Gate {
    /// A relay to the S3 endpoint of `DDIT_S3_ENDPOINT` (`http://host:port`).
    pub fn start() -> Self {
        let upstream = var("DDIT_S3_ENDPOINT", "http://127.0.0.1:3900");
        let upstream = upstream.trim_start_matches("http://").to_string();
        let port = free_port();
        let open = Arc::new(AtomicBool::new(true));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (flag, conns) = (open.clone(), live.clone());
        std::thread::spawn(move || {
            let mut listener = Some(listen(port));
            loop {
                match (&listener, flag.load(Ordering::SeqCst)) {
                    (Some(_), false) => listener = None,
                    (None, true) => listener = Some(listen(port)),
                    (None, false) => {}
                    (Some(l), true) => match l.accept() {
                        Ok((client, _)) => {
                            client.set_nonblocking(false).unwrap();
                            let Ok(server) = TcpStream::connect(&upstream) else {
                                continue; // S3 itself is down: the client sees its connection close
                            };
                            let mut c = conns.lock().unwrap();
                            c.push(client.try_clone().unwrap());
                            c.push(server.try_clone().unwrap());
                            pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                            pipe(server, client);
                            continue;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => panic!("accept: {e}"),
                    },
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            open,
            live,
        }
    }

    /// Shuts the gate for `down` on a thread of its own (the soak goes on publishing meanwhile).
    pub fn outage(&self, down: Duration) -> std::thread::JoinHandle<()> {
        let (open, live) = (self.open.clone(), self.live.clone());
        std::thread::spawn(move || {
            eprintln!("soak: S3 unreachable for {down:?}");
            open.store(false, Ordering::SeqCst);
            for c in live.lock().unwrap().drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
            std::thread::sleep(down);
            open.store(true, Ordering::SeqCst);
            eprintln!("soak: S3 reachable again");
        })
    }
}
