//! The proxy's listeners and accept loop: every accepted connection is matched with its kernel
//! record (where it was going, who opened it) and handed on.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::original_dst::{ClientAddr, ListenAddr, OriginalDst, OriginalDstSource};

/// How long connecting to an original destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Listen backlog: a node pulling many images opens many connections at once.
const BACKLOG: u32 = 1024;

/// Binds the proxy port on each loopback address.
pub fn bind(addresses: &[std::net::IpAddr], port: u16) -> std::io::Result<Vec<TcpListener>> {
    addresses
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(*ip, port);
            let socket = if ip.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket
                .bind(addr)
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))?;
            socket.listen(BACKLOG)
        })
        .collect()
}

/// Accepts on every listener until the task is dropped.
pub async fn serve(listeners: Vec<TcpListener>, records: Arc<dyn OriginalDstSource>) {
    let mut tasks = JoinSet::new();
    for listener in listeners {
        let records = records.clone();
        tasks.spawn(accept_loop(listener, records));
    }
    while tasks.join_next().await.is_some() {}
}

async fn accept_loop(listener: TcpListener, records: Arc<dyn OriginalDstSource>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        match records.take(ClientAddr(peer), ListenAddr(local)) {
            Some(orig) => {
                tokio::spawn(splice(stream, orig));
            }
            None => debug!(%peer, "connection without a redirect record; closing"),
        }
    }
}

/// Relays bytes between the client and its original destination, untouched.
pub async fn splice(mut client: TcpStream, orig: OriginalDst) {
    info!(
        dst = %orig.addr,
        pid = orig.process.pid,
        comm = %orig.process.comm,
        cgroup_id = orig.process.cgroup_id,
        "redirected connection"
    );
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(orig.addr.0))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(dst = %orig.addr, error = %e, "connecting to the original destination failed");
            return;
        }
        Err(_) => {
            warn!(dst = %orig.addr, "connecting to the original destination timed out");
            return;
        }
    };
    let mut upstream = upstream;
    if let Err(e) = copy_bidirectional(&mut client, &mut upstream).await {
        debug!(dst = %orig.addr, error = %e, "splice ended");
    }
}
