//! A minimal TCP client for the redirect tests: connects to the address in argv[1], sends a line,
//! reads one back, and prints `{"local", "peer", "reply"}` (or `{"error"}`) as JSON. A V6 address,
//! including `::ffff:a.b.c.d`, uses an AF_INET6 (dual-stack) socket.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let Some(dst) = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        eprintln!("usage: pp-probe <addr:port>");
        return ExitCode::from(2);
    };
    match talk(dst) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}", serde_json::json!({ "error": e.to_string() }));
            ExitCode::FAILURE
        }
    }
}

fn talk(dst: SocketAddr) -> std::io::Result<serde_json::Value> {
    let stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    (&stream).write_all(b"hello\n")?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    Ok(serde_json::json!({
        "local": local.to_string(),
        "peer": peer.to_string(),
        "reply": reply.trim_end(),
    }))
}
