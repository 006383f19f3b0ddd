//! Who holds a local TCP port: the sockets in `/proc/net/tcp{,6}` (this network namespace) and
//! the processes whose `/proc/<pid>/fd` point at them, so that "address in use" names what to
//! stop.

use std::{
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

/// TCP states in `/proc/net/tcp` (`include/net/tcp_states.h`).
const TCP_TIME_WAIT: u8 = 0x06;
const TCP_LISTEN: u8 = 0x0a;
/// At most this many processes are named per socket.
const MAX_NAMED: usize = 3;

/// One socket bound to the port, and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortHolder {
    pub(crate) addr: SocketAddr,
    pub(crate) listening: bool,
    /// Owner of the socket, as `/proc/net/tcp` reports it.
    pub(crate) uid: u32,
    pub(crate) inode: u64,
    /// (pid, comm) of the processes holding it that are visible here.
    pub(crate) processes: Vec<(u32, String)>,
}

impl fmt::Display for PortHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.listening { "listening" } else { "bound" };
        write!(f, "{} ({state}) is held by ", self.addr)?;
        if self.processes.is_empty() {
            return write!(
                f,
                "uid {} (socket inode {}), no process visible here (from a pod without hostPID, \
                 or without CAP_SYS_PTRACE for another user's process, look on the host: \
                 ss -ltnp 'sport = :{}')",
                self.uid,
                self.inode,
                self.addr.port()
            );
        }
        let named: Vec<String> = self
            .processes
            .iter()
            .map(|(pid, comm)| format!("pid {pid} ({comm})"))
            .collect();
        write!(f, "{}, uid {}", named.join(", "), self.uid)
    }
}

/// A socket line of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketLine {
    addr: SocketAddr,
    state: u8,
    uid: u32,
    inode: u64,
}

/// The sockets bound to `port` (TIME_WAIT left out: it blocks no bind that pullproxy makes), from
/// this network namespace's `/proc/net/tcp{,6}` under `proc_root`, listeners first, with the
/// processes that hold them.
pub(crate) fn holders(proc_root: &Path, port: u16) -> Vec<PortHolder> {
    let mut sockets: Vec<SocketLine> = ["net/tcp", "net/tcp6"]
        .iter()
        .filter_map(|f| fs::read_to_string(proc_root.join(f)).ok())
        .flat_map(|text| parse_sockets(&text))
        .filter(|s| s.addr.port() == port && s.state != TCP_TIME_WAIT)
        .collect();
    sockets.sort_by_key(|s| s.state != TCP_LISTEN);
    let owners = socket_owners(
        proc_root,
        &sockets.iter().map(|s| s.inode).collect::<Vec<_>>(),
    );
    sockets
        .into_iter()
        .map(|s| PortHolder {
            addr: s.addr,
            listening: s.state == TCP_LISTEN,
            uid: s.uid,
            inode: s.inode,
            processes: owners
                .iter()
                .filter(|(inode, _, _)| *inode == s.inode)
                .map(|(_, pid, comm)| (*pid, comm.clone()))
                .take(MAX_NAMED)
                .collect(),
        })
        .collect()
}

/// Whether a listener on `addr` takes connections meant for pullproxy's listeners on `ours`
/// (same port): it is on one of those addresses, on loopback (where the kernel redirects to), or
/// on the unspecified address (every address).
pub(crate) fn intercepts(addr: IpAddr, ours: &[IpAddr]) -> bool {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    addr.is_loopback() || addr.is_unspecified() || ours.contains(&addr)
}

/// Socket lines of `/proc/net/tcp{,6}` text; malformed lines are skipped.
fn parse_sockets(text: &str) -> Vec<SocketLine> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (ip, port) = fields.get(1)?.split_once(':')?;
            Some(SocketLine {
                addr: SocketAddr::new(parse_ip(ip)?, u16::from_str_radix(port, 16).ok()?),
                state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                uid: fields.get(7)?.parse().ok()?,
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// An address as the kernel prints it: the `__be32` words of the address, each printed as a
/// native-endian `%08X`.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// (inode, pid, comm) for every open fd under `proc_root` that is one of `inodes`. Processes
/// whose fds cannot be read (another user's, without CAP_SYS_PTRACE) are skipped.
fn socket_owners(proc_root: &Path, inodes: &[u64]) -> Vec<(u64, u32, String)> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for entry in fs::read_dir(proc_root).into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = socket_inode(&target.to_string_lossy()) else {
                continue;
            };
            if inodes.contains(&inode) && !found.iter().any(|(i, p, _)| *i == inode && *p == pid) {
                let comm = fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim_end().to_owned())
                    .unwrap_or_else(|_| "?".into());
                found.push((inode, pid, comm));
            }
        }
    }
    found.sort_by_key(|(_, pid, _)| *pid);
    found
}

/// The inode of an fd link `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Taken from a little-endian machine: 127.0.0.1:15443 listening (uid 65534), 0.0.0.0:22, a
    // TIME_WAIT socket on 15443, and in tcp6 [::1]:15443 and [::ffff:127.0.0.1]:15090.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3C53 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17 1 0000000000000000 100 0 0 10 0
   2: 0100007F:3C53 0100007F:C350 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:3C53 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100007F:3AF2 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 778 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn proc_net_tcp_lines_are_parsed_in_both_families() {
        let v4 = parse_sockets(TCP);
        assert_eq!(v4.len(), 3);
        assert_eq!(v4[0].addr, "127.0.0.1:15443".parse().unwrap());
        assert_eq!(
            (v4[0].state, v4[0].uid, v4[0].inode),
            (TCP_LISTEN, 65534, 4242)
        );
        assert_eq!(v4[1].addr, "0.0.0.0:22".parse().unwrap());
        let v6 = parse_sockets(TCP6);
        assert_eq!(v6[0].addr, "[::1]:15443".parse().unwrap());
        assert_eq!(v6[1].addr, "[::ffff:127.0.0.1]:15090".parse().unwrap());
        assert!(parse_sockets("header\n garbage line\n").is_empty());
    }

    #[test]
    fn the_holder_is_named_by_pid_and_comm_and_time_wait_is_ignored() {
        let root = tempfile::tempdir().unwrap();
        let proc_root = root.path();
        fs::create_dir_all(proc_root.join("net")).unwrap();
        fs::write(proc_root.join("net/tcp"), TCP).unwrap();
        fs::write(proc_root.join("net/tcp6"), TCP6).unwrap();
        for (pid, comm, sockets) in [
            (31, "squatter", &[4242u64][..]),
            (32, "bash", &[17][..]),
            (33, "v6", &[777][..]),
        ] {
            let dir = proc_root.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            for (fd, inode) in sockets.iter().enumerate() {
                let link = dir.join("fd").join(fd.to_string());
                std::os::unix::fs::symlink(format!("socket:[{inode}]"), link).unwrap();
            }
        }
        let found = holders(proc_root, 15443);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].processes, vec![(31, "squatter".to_owned())]);
        assert_eq!(
            found[0].to_string(),
            "127.0.0.1:15443 (listening) is held by pid 31 (squatter), uid 65534"
        );
        assert_eq!(found[1].processes, vec![(33, "v6".to_owned())]);
        // A socket no visible process holds still names its owner and where to look.
        let hidden = &holders(proc_root, 15090)[0];
        assert!(!hidden.listening);
        let text = hidden.to_string();
        assert!(
            text.contains("[::ffff:127.0.0.1]:15090 (bound)")
                && text.contains("uid 0 (socket inode 778)")
                && text.contains("ss -ltnp 'sport = :15090'"),
            "{text}"
        );
        assert!(holders(proc_root, 80).is_empty());
    }

    #[test]
    fn listeners_that_intercept_are_loopback_unspecified_or_ours() {
        let ours: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap()];
        for addr in [
            "127.0.0.1",
            "127.0.0.2",
            "0.0.0.0",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.5",
        ] {
            assert!(intercepts(addr.parse().unwrap(), &ours), "{addr}");
        }
        for addr in ["10.0.0.6", "fd00::1", "::ffff:10.0.0.6"] {
            assert!(!intercepts(addr.parse().unwrap(), &ours), "{addr}");
        }
    }
}
