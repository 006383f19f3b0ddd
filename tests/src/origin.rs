//! A stand-in "original destination": a TCP server inside the test's network namespace that
//! answers each connection with what it saw, so a test can tell whether bytes went through.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::netns::NetNs;

/// Listens until dropped.
pub struct Origin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Origin {
    /// Listens on `addr` inside `netns`. Each connection: read a line, answer
    /// `origin <addr> saw <peer>` and close.
    pub fn start(netns: &NetNs, addr: SocketAddr) -> Self {
        let listener = netns.run_in(|| TcpListener::bind(addr).expect("bind origin"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut reader = BufReader::new(&stream);
                        let mut line = String::new();
                        let _ = reader.read_line(&mut line);
                        let _ =
                            (&stream).write_all(format!("origin {addr} saw {peer}\n").as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
