//! Runs `pp-probe` (a tiny TCP client) as its own process in a chosen namespace and cgroup, and
//! reports what it saw.

use std::{net::SocketAddr, process::Command};

use crate::{
    cgroup::Cgroup,
    netns::NetNs,
    process::{Proc, sibling_binary},
};

/// What the client process saw.
#[derive(Debug, Clone)]
pub struct Probe {
    pub pid: u32,
    /// The client socket's local address: loopback means the kernel redirected it.
    pub local: SocketAddr,
    /// `getpeername()`: the original destination, even when redirected.
    pub peer: SocketAddr,
    /// The line the other end answered.
    pub reply: String,
}

impl Probe {
    /// Whether the connection was rewritten to the proxy on loopback.
    pub fn redirected(&self) -> bool {
        match self.local.ip() {
            std::net::IpAddr::V4(a) => a.is_loopback(),
            std::net::IpAddr::V6(a) => {
                a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        }
    }
}

/// Connects from a new process in `netns` and `cgroup` to `dst`.
pub fn connect(netns: &NetNs, cgroup: &Cgroup, dst: SocketAddr) -> Result<Probe, String> {
    let mut cmd = Command::new(sibling_binary("pp-probe"));
    cmd.arg(dst.to_string())
        .stdout(std::process::Stdio::piped());
    let mut proc = Proc::spawn(cmd, Some(netns), Some(cgroup));
    let pid = proc.pid();
    let mut out = String::new();
    use std::io::Read;
    proc.child_mut()
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("probe output {out:?}: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(err.to_string());
    }
    let addr = |k: &str| -> Result<SocketAddr, String> {
        v[k].as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("probe output without {k}: {out}"))
    };
    Ok(Probe {
        pid,
        local: addr("local")?,
        peer: addr("peer")?,
        reply: v["reply"].as_str().unwrap_or_default().to_owned(),
    })
}
