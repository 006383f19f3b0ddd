//! What every accepted connection on the proxy and admin listeners goes through: a place in the
//! listener's budget or an immediate close (`limit`), deadlines from accept to the last byte
//! (`deadline`), an accept loop that backs off when file descriptors run out, and the open-file
//! limit raised at start. Idle and stalled clients cannot exhaust descriptors, and when accept
//! fails anyway the listener keeps going. Also the file bodies a transport sends with
//! `sendfile` (`sendfile`).

mod deadline;
mod limit;
mod sendfile;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response};
use http_body::Body;
use hyper::{body::Incoming, service::Service};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info, warn};

pub use self::{deadline::Deadlines, limit::Limits};
pub(crate) use self::{
    deadline::Reset,
    limit::{ClientKey, Permit},
    sendfile::FileSender,
};
use self::{
    deadline::{Ended, serve},
    limit::Limiter,
};

/// Why pullproxy closed a connection before the client did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum CloseReason {
    /// No complete ClientHello (or plain-HTTP request head) before the handshake deadline.
    PeekTimeout,
    /// The TLS handshake did not finish before the handshake deadline.
    HandshakeTimeout,
    /// A request head started but did not finish in time.
    HeaderTimeout,
    /// No request in flight and none started for too long.
    Idle,
    /// A write waited too long on a client that does not read.
    WriteTimeout,
    /// The listener holds as many connections as it may.
    LimitGlobal,
    /// The client (a process, or an admin peer) holds as many as it may.
    LimitClient,
    /// Connections without a kernel record hold as many as they may together.
    LimitDirect,
}

impl CloseReason {
    const ALL: [Self; 8] = [
        Self::PeekTimeout,
        Self::HandshakeTimeout,
        Self::HeaderTimeout,
        Self::Idle,
        Self::WriteTimeout,
        Self::LimitGlobal,
        Self::LimitClient,
        Self::LimitDirect,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::PeekTimeout => "peek_timeout",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::HeaderTimeout => "header_timeout",
            Self::Idle => "idle",
            Self::WriteTimeout => "write_timeout",
            Self::LimitGlobal => "limit_global",
            Self::LimitClient => "limit_client",
            Self::LimitDirect => "limit_direct",
        }
    }
}

/// Which listener a connection arrived on (the `listener` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    Proxy,
    Admin,
}

impl ListenerKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Admin => "admin",
        }
    }
}

type Labels<const N: usize> = [(&'static str, &'static str); N];

/// Connection metrics of both listeners.
#[derive(Debug, Default)]
pub(crate) struct ConnMetrics {
    closed: Family<Labels<2>, Counter>,
    open: Family<Labels<1>, Gauge>,
    accept_errors: Family<Labels<2>, Counter>,
}

impl ConnMetrics {
    /// Registers the metrics (names get the registry's `pullproxy_` prefix).
    pub(crate) fn register(&self, reg: &mut Registry) {
        reg.register(
            "connections_closed",
            "Connections pullproxy closed before the client did, by listener (proxy, admin) and \
             reason: peek_timeout (no ClientHello or request head in time), handshake_timeout, \
             header_timeout (a request head too slow), idle (no request for too long), \
             write_timeout (the client stopped reading), limit_global, limit_client (one process \
             or admin peer over its budget), limit_direct (connections without a kernel record \
             over their shared budget)",
            self.closed.clone(),
        );
        reg.register(
            "connections_open",
            "Open connections by listener",
            self.open.clone(),
        );
        reg.register(
            "accept_errors",
            "Failed accept() calls by listener and reason (fd_limit: out of file descriptors, \
             other); the listener backs off and keeps accepting",
            self.accept_errors.clone(),
        );
    }
}

/// First pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`] while accept keeps
/// failing. A listener whose accept fails (out of descriptors) stays readable: retrying at once
/// would spin.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The `reason` of a failed accept: out of descriptors (the process's or the system's), or not.
const ACCEPT_ERRORS: [&str; 2] = ["fd_limit", "other"];

fn accept_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    ACCEPT_BACKOFF_FIRST
        .saturating_mul(1 << doublings)
        .min(ACCEPT_BACKOFF_MAX)
}

/// One listener's door: its connection budget, its deadlines and its metrics.
pub(crate) struct Gate {
    kind: ListenerKind,
    deadlines: Deadlines,
    limiter: Limiter,
    metrics: Arc<ConnMetrics>,
}

impl Gate {
    pub(crate) fn new(
        kind: ListenerKind,
        deadlines: Deadlines,
        limits: Limits,
        metrics: Arc<ConnMetrics>,
    ) -> Self {
        let open = metrics
            .open
            .get_or_create(&[("listener", kind.label())])
            .clone();
        // Every series exists from the start at 0: dashboards and alerts see "none yet", not
        // "unknown", and `rate()` counts the first one.
        for reason in CloseReason::ALL {
            let _ = metrics
                .closed
                .get_or_create(&[("listener", kind.label()), ("reason", reason.label())]);
        }
        for reason in ACCEPT_ERRORS {
            let _ = metrics
                .accept_errors
                .get_or_create(&[("listener", kind.label()), ("reason", reason)]);
        }
        Self {
            kind,
            deadlines,
            limiter: Limiter::new(limits, open),
            metrics,
        }
    }

    pub(crate) fn deadlines(&self) -> Deadlines {
        self.deadlines
    }

    /// The next connection. A failed accept (out of descriptors, most likely) is counted and
    /// retried after a pause that grows while it keeps failing.
    pub(crate) async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        let mut failures: u32 = 0;
        loop {
            match listener.accept().await {
                Ok(accepted) => {
                    if failures > 0 {
                        info!(
                            listener = self.kind.label(),
                            failures, "accepting connections again"
                        );
                    }
                    return accepted;
                }
                Err(e) => {
                    failures += 1;
                    let reason = match e.raw_os_error() {
                        Some(libc::EMFILE | libc::ENFILE) => ACCEPT_ERRORS[0],
                        _ => ACCEPT_ERRORS[1],
                    };
                    self.metrics
                        .accept_errors
                        .get_or_create(&[("listener", self.kind.label()), ("reason", reason)])
                        .inc();
                    if failures == 1 {
                        warn!(
                            listener = self.kind.label(),
                            error = %e,
                            "accept failed; backing off until it succeeds"
                        );
                    }
                    tokio::time::sleep(accept_backoff(failures)).await;
                }
            }
        }
    }

    /// A place for a connection of `key`, or `None` (counted and logged): the caller closes it.
    pub(crate) fn admit(&self, key: ClientKey) -> Option<Permit> {
        match self.limiter.admit(key) {
            Ok(permit) => Some(permit),
            Err(reason) => {
                self.closed(reason);
                let (open, of_client) = self.limiter.open(key);
                let limits = self.limiter.limits();
                match key {
                    // A container runtime refused: its pull may fail. Worth a warning.
                    ClientKey::Process { cgroup_id, pid } => warn!(
                        listener = self.kind.label(),
                        pid,
                        cgroup_id,
                        reason = reason.label(),
                        open,
                        of_client,
                        limit = limits.total,
                        limit_per_client = limits.per_client,
                        "connection refused: over the connection limit"
                    ),
                    ClientKey::Direct | ClientKey::Peer(_) => debug!(
                        listener = self.kind.label(),
                        client = ?key,
                        reason = reason.label(),
                        open,
                        of_client,
                        "connection refused: over the connection limit"
                    ),
                }
                None
            }
        }
    }

    /// Counts a connection closed for `reason`.
    pub(crate) fn closed(&self, reason: CloseReason) {
        self.metrics
            .closed
            .get_or_create(&[("listener", self.kind.label()), ("reason", reason.label())])
            .inc();
    }

    /// Serves HTTP on `io` under the listener's deadlines, counting a deadline that closes it.
    pub(crate) async fn serve_http<I, S, B>(&self, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Reset + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Unpin + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match serve(io, service, self.deadlines).await {
            Ended::Served(Ok(())) => {}
            Ended::Served(Err(e)) => debug!(
                listener = self.kind.label(),
                error = %crate::telemetry::error_chain(e.as_ref()),
                "connection ended with an error"
            ),
            Ended::Closed(reason) => {
                self.closed(reason);
                debug!(
                    listener = self.kind.label(),
                    reason = reason.label(),
                    "connection closed: deadline passed"
                );
            }
        }
    }
}

/// Descriptors kept free for everything that is not a connection: listeners, kernel maps, the
/// cache index, log and credential files.
const RESERVED_FDS: u64 = 256;
/// Descriptors one connection may hold at once: its socket, an upstream or hub socket (or the
/// other end of a splice), and a cache file.
const FDS_PER_CONNECTION: u64 = 3;

/// The open-file limit at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdLimit {
    /// The soft limit pullproxy was started with.
    pub(crate) inherited: u64,
    /// The soft limit now (the hard limit, when raising it worked).
    pub(crate) soft: u64,
    pub(crate) hard: u64,
}

impl FdLimit {
    /// How many connections (both listeners together) fit in the soft limit.
    pub(crate) fn connections(&self) -> usize {
        usize::try_from(self.soft.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION)
            .unwrap_or(usize::MAX)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: many connections need many descriptors,
/// and the inherited soft limit is often 1024.
pub(crate) fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct passed, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let inherited = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct passed, which outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(FdLimit {
        inherited,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_grows_to_a_ceiling() {
        let pauses: Vec<u128> = (1..=10).map(|f| accept_backoff(f).as_millis()).collect();
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(accept_backoff(u32::MAX), ACCEPT_BACKOFF_MAX);
    }

    #[test]
    fn the_fd_limit_leaves_room_for_everything_else() {
        let limit = |soft| FdLimit {
            inherited: 1024,
            soft,
            hard: soft,
        };
        assert_eq!(limit(1024).connections(), 256);
        assert_eq!(limit(100).connections(), 0);
        assert_eq!(limit(1 << 20).connections(), ((1 << 20) - 256) / 3);
    }

    #[test]
    fn raising_the_fd_limit_reaches_the_hard_limit() {
        let limit = raise_fd_limit().unwrap();
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.soft >= limit.inherited);
    }

    #[test]
    fn refusals_and_deadlines_are_counted_by_listener_and_reason() {
        let metrics = Arc::new(ConnMetrics::default());
        let deadlines = Deadlines {
            handshake: Duration::from_secs(1),
            header: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            write: Duration::from_secs(1),
        };
        let limits = Limits {
            total: 1,
            per_client: 1,
            direct: 1,
        };
        let proxy = Gate::new(ListenerKind::Proxy, deadlines, limits, metrics.clone());
        let admin = Gate::new(ListenerKind::Admin, deadlines, limits, metrics.clone());
        let held = proxy.admit(ClientKey::Direct).unwrap();
        assert!(proxy.admit(ClientKey::Direct).is_none());
        let _admin = admin
            .admit(ClientKey::peer("10.0.0.1".parse().unwrap()))
            .unwrap();
        assert!(
            admin
                .admit(ClientKey::peer("10.0.0.2".parse().unwrap()))
                .is_none()
        );
        proxy.closed(CloseReason::Idle);
        let mut reg = Registry::with_prefix("pullproxy");
        metrics.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for line in [
            r#"pullproxy_connections_closed_total{listener="proxy",reason="limit_direct"} 1"#,
            r#"pullproxy_connections_closed_total{listener="admin",reason="limit_global"} 1"#,
            r#"pullproxy_connections_closed_total{listener="proxy",reason="idle"} 1"#,
            r#"pullproxy_connections_open{listener="proxy"} 1"#,
            r#"pullproxy_connections_open{listener="admin"} 1"#,
            r#"pullproxy_connections_closed_total{listener="admin",reason="write_timeout"} 0"#,
            r#"pullproxy_accept_errors_total{listener="proxy",reason="fd_limit"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        drop(held);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(r#"pullproxy_connections_open{listener="proxy"} 0"#),
            "{text}"
        );
    }
}
