//! A would-be squatter for the bind guard tests: optionally renames itself (`--comm NAME`, what a
//! process pretending to be a container runtime does), tries to listen on each address given
//! (`tcp:127.0.0.1:15443`, `tcp:[::]:15443`, `udp:0.0.0.0:15443`), prints
//! `{"pid", "results": [{"addr", "ok", "errno"}]}` as one JSON line, then holds whatever it bound
//! until stdin closes.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    process::ExitCode,
};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "--comm") {
        args.next();
        let Some(name) = args.next() else {
            return usage();
        };
        if let Err(e) = std::fs::write("/proc/self/comm", &name) {
            eprintln!("pp-listen: renaming to {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    let mut results = Vec::new();
    for spec in args {
        let Some((proto, addr)) = spec.split_once(':') else {
            return usage();
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            return usage();
        };
        let bound: std::io::Result<Box<dyn std::any::Any>> = match proto {
            "tcp" => TcpListener::bind(addr).map(|l| Box::new(l) as _),
            "udp" => UdpSocket::bind(addr).map(|s| Box::new(s) as _),
            _ => return usage(),
        };
        let errno = match bound {
            Ok(socket) => {
                held.push(socket);
                None
            }
            Err(e) => Some(e.raw_os_error().unwrap_or(-1)),
        };
        results.push(serde_json::json!({
            "addr": spec,
            "ok": errno.is_none(),
            "errno": errno,
        }));
    }
    let line = serde_json::json!({ "pid": std::process::id(), "results": results });
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    drop(out);
    // Hold the sockets until the test lets go.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(held);
    ExitCode::SUCCESS
}

fn usage() -> ExitCode {
    eprintln!("usage: pp-listen [--comm NAME] (tcp|udp):ADDR:PORT ...");
    ExitCode::from(2)
}
