//! Deadlines inside an HTTP connection, for HTTP/1.1 and HTTP/2 alike: the idle time between
//! requests, the time a request head may take once its first byte arrived, and how long a write
//! may wait on a client that does not read. Response bodies have no total deadline.
//!
//! hyper does not cover these. Its HTTP/1 `header_read_timeout` starts when the connection goes
//! idle, so it is one bound for "idle" and "slow head" together; it needs a timer to work at all;
//! and hyper-util's auto builder reads the first bytes (HTTP/2 preface or not) before hyper's
//! HTTP/1 code runs, with no deadline. hyper has no idle bound for HTTP/2 and no write deadline.
//! So the connection's IO and service are wrapped here: the IO counts what the client sends and
//! notes when a write blocks, the service counts requests in flight (until their response body
//! is dropped), and [`serve`] closes the connection when a deadline passes.

use std::{
    future::poll_fn,
    io,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, service::Service};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use super::CloseReason;

/// The deadlines of a listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// From accept to a completed TLS handshake (ClientHello peek included).
    pub(crate) handshake: Duration,
    /// From the first byte of a request head to the whole head.
    pub(crate) header: Duration,
    /// With no request in flight and no byte of the next one.
    pub(crate) idle: Duration,
    /// A write blocked on a client that does not read.
    pub(crate) write: Duration,
}

/// What the IO and the service report to the watch. Shared with spawned HTTP/2 stream tasks.
struct Activity {
    /// The zero of `write_blocked_at`.
    base: Instant,
    /// Requests whose head arrived and whose response body is not dropped yet.
    in_flight: AtomicUsize,
    /// Requests started so far: tells the watch that one came and went between two looks.
    started: AtomicU64,
    /// Bytes read from the client.
    read: AtomicU64,
    /// The client sent the HTTP/2 preface: there is no "request head" phase on the connection.
    h2: AtomicBool,
    /// When the pending write blocked, as nanoseconds after `base` plus one; 0: none blocked.
    write_blocked_at: AtomicU64,
    /// Reset the transport when it is dropped instead of closing it.
    reset: AtomicBool,
    /// The watching task, woken when the last request in flight ends on another task.
    waker: AtomicWaker,
}

#[derive(Clone, Copy, Debug)]
struct Snapshot {
    in_flight: usize,
    started: u64,
    read: u64,
    h2: bool,
    write_blocked_since: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            read: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            write_blocked_at: AtomicU64::new(0),
            reset: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let blocked = self.write_blocked_at.load(Ordering::Acquire);
        Snapshot {
            in_flight: self.in_flight.load(Ordering::Acquire),
            started: self.started.load(Ordering::Acquire),
            read: self.read.load(Ordering::Acquire),
            h2: self.h2.load(Ordering::Acquire),
            write_blocked_since: (blocked != 0)
                .then(|| self.base + Duration::from_nanos(blocked - 1)),
        }
    }

    fn write_blocked(&self) {
        if self.write_blocked_at.load(Ordering::Relaxed) == 0 {
            let nanos = Instant::now().duration_since(self.base).as_nanos();
            let at = u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1;
            self.write_blocked_at.store(at, Ordering::Release);
        }
    }

    fn write_progressed(&self) {
        self.write_blocked_at.store(0, Ordering::Release);
    }
}

/// One request in flight; dropped with its response body (or with the service future, when the
/// client goes away first).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::AcqRel);
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waker.wake();
        }
    }
}

/// A response body that keeps its request in flight until it is dropped.
pub(crate) struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A transport that can be reset rather than closed. A client that stopped reading leaves
/// unsent bytes in the kernel, which a normal close would go on trying to deliver (holding
/// memory, and the client never hears of the close); a reset drops them.
pub(crate) trait Reset {
    /// Makes dropping the transport reset the connection.
    fn reset_on_drop(&self);
}

impl Reset for tokio::net::TcpStream {
    fn reset_on_drop(&self) {
        // Failing leaves an ordinary close, which is still a close.
        let _ = self.set_zero_linger();
    }
}

impl<IO: Reset> Reset for tokio_rustls::server::TlsStream<IO> {
    fn reset_on_drop(&self) {
        self.get_ref().0.reset_on_drop();
    }
}

/// The HTTP/2 connection preface: a client that starts with it has no HTTP/1 request heads.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The connection's IO, reporting reads and blocked writes to the watch.
struct GuardedIo<I: Reset> {
    inner: I,
    activity: Arc<Activity>,
    /// How much of the HTTP/2 preface the first bytes matched; `None` once decided.
    preface: Option<usize>,
    /// A flush returned pending: its completion is progress.
    flush_pending: bool,
}

impl<I: Reset> Drop for GuardedIo<I> {
    fn drop(&mut self) {
        if self.activity.reset.load(Ordering::Acquire) {
            self.inner.reset_on_drop();
        }
    }
}

impl<I: Reset> GuardedIo<I> {
    fn new(inner: I, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            preface: Some(0),
            flush_pending: false,
        }
    }

    fn sniff(&mut self, bytes: &[u8]) {
        let Some(matched) = self.preface else { return };
        let n = bytes.len().min(H2_PREFACE.len() - matched);
        if bytes[..n] != H2_PREFACE[matched..matched + n] {
            self.preface = None;
        } else if matched + n == H2_PREFACE.len() {
            self.preface = None;
            self.activity.h2.store(true, Ordering::Release);
        } else {
            self.preface = Some(matched + n);
        }
    }

    fn wrote<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        progress: impl Fn(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match &r {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Ok(v)) if progress(v) => self.activity.write_progressed(),
            Poll::Ready(_) => {}
        }
        r
    }
}

impl<I: AsyncRead + Reset + Unpin> AsyncRead for GuardedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                self.activity
                    .read
                    .fetch_add(new.len() as u64, Ordering::AcqRel);
                self.sniff(new);
            }
        }
        r
    }
}

impl<I: AsyncWrite + Reset + Unpin> AsyncWrite for GuardedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(r, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        // A flush that completes at once says nothing (a TCP socket has nothing to flush); one
        // that completes after blocking moved bytes.
        let was_pending = std::mem::replace(&mut self.flush_pending, r.is_pending());
        self.wrote(r, |_| was_pending)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.wrote(r, |_| true)
    }
}

/// What the watch decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Nothing is due; look again at this instant (or when woken).
    Wait(Option<Instant>),
    Expired(CloseReason),
}

/// The deadline state machine, fed with snapshots of the connection's [`Activity`].
#[derive(Debug)]
struct Watch {
    deadlines: Deadlines,
    /// A request was in flight at the last look.
    busy: bool,
    seen_started: u64,
    /// When the connection last became idle (no request in flight).
    idle_since: Instant,
    /// Bytes read when it became idle: more means the next request head has begun.
    read_at_idle: u64,
    /// When the first byte of the next request head was seen.
    head_since: Option<Instant>,
    /// When the connection was asked to shut down gracefully after being idle too long.
    draining_since: Option<Instant>,
}

impl Watch {
    fn new(deadlines: Deadlines, now: Instant) -> Self {
        Self {
            deadlines,
            busy: false,
            seen_started: 0,
            idle_since: now,
            read_at_idle: 0,
            head_since: None,
            draining_since: None,
        }
    }

    fn check(&mut self, now: Instant, s: Snapshot) -> Verdict {
        if s.in_flight > 0 {
            self.busy = true;
            self.head_since = None;
        } else if self.busy || s.started != self.seen_started {
            self.busy = false;
            self.idle_since = now;
            self.read_at_idle = s.read;
            self.head_since = None;
        }
        self.seen_started = s.started;
        if s.h2 {
            // HTTP/2 frames arrive whole or not at all from hyper's point of view; what the
            // client sends between requests (pings, window updates) is not a request head.
            self.head_since = None;
        } else if !self.busy && self.head_since.is_none() && s.read > self.read_at_idle {
            self.head_since = Some(now);
        }

        let mut due: Option<(Instant, CloseReason)> = None;
        if !self.busy {
            let d = &self.deadlines;
            due = Some(match (self.head_since, self.draining_since) {
                (Some(head), _) => (head + d.header, CloseReason::HeaderTimeout),
                (None, Some(drain)) => (drain.max(self.idle_since) + d.header, CloseReason::Idle),
                (None, None) => (self.idle_since + d.idle, CloseReason::Idle),
            });
        }
        if let Some(blocked) = s.write_blocked_since {
            let write = (blocked + self.deadlines.write, CloseReason::WriteTimeout);
            due = Some(match due {
                Some(d) if d.0 <= write.0 => d,
                _ => write,
            });
        }
        match due {
            Some((at, reason)) if now >= at => Verdict::Expired(reason),
            Some((at, _)) => Verdict::Wait(Some(at)),
            None => Verdict::Wait(None),
        }
    }

    /// Starts a graceful shutdown: the client gets `header` more to finish what it started.
    fn drain(&mut self, now: Instant) {
        self.draining_since = Some(now);
    }

    fn draining(&self) -> bool {
        self.draining_since.is_some()
    }
}

/// How a connection ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The client closed it, or hyper ended it (with the error, if any).
    Served(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    /// A deadline passed. A connection that was idle too long was shut down gracefully first.
    Closed(CloseReason),
}

/// Serves HTTP/1.1 or HTTP/2 on `io` with `service` under `deadlines`.
pub(crate) async fn serve<I, S, B>(io: I, service: S, deadlines: Deadlines) -> Ended
where
    I: AsyncRead + AsyncWrite + Reset + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(GuardedIo::new(io, activity.clone()));
    let tracked = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = InFlight::new(&activity);
            let response = service.call(req);
            async move {
                let response = response.await?;
                Ok::<_, S::Error>(response.map(|inner| TrackedBody {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1 timer stays unset on purpose: with one, its `header_read_timeout` (30 s by
    // default) would close idle keep-alive connections before `idle` passes. Vectored writes
    // keep response bodies' buffers as they are (no copy into hyper's own), which file bodies
    // need (`super::sendfile`).
    builder.http1().writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // While requests are open, a client that stops answering pings is gone.
        .keep_alive_interval(Some(deadlines.idle))
        .keep_alive_timeout(deadlines.header);
    let mut conn = pin!(builder.serve_connection(io, tracked));
    let mut watch = Watch::new(deadlines, Instant::now());
    let mut sleep = pin!(tokio::time::sleep_until(Instant::now() + deadlines.idle));
    poll_fn(|cx| {
        activity.waker.register(cx.waker());
        loop {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(if watch.draining() {
                    // It ended because it was idle too long.
                    Ended::Closed(CloseReason::Idle)
                } else {
                    Ended::Served(r)
                });
            }
            match watch.check(Instant::now(), activity.snapshot()) {
                Verdict::Wait(None) => return Poll::Pending,
                Verdict::Wait(Some(at)) => {
                    if sleep.deadline() != at {
                        sleep.as_mut().reset(at);
                    }
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Verdict::Expired(CloseReason::Idle) if !watch.draining() => {
                    // Idle: say goodbye properly (HTTP/2 GOAWAY; HTTP/1 closes at once), then
                    // give the client `header` to finish anything that crossed it.
                    watch.drain(Instant::now());
                    conn.as_mut().graceful_shutdown();
                }
                Verdict::Expired(reason) => {
                    if reason == CloseReason::WriteTimeout {
                        activity.reset.store(true, Ordering::Release);
                    }
                    // A connection shut down for idling is counted as idle whatever ends it.
                    let reason = if watch.draining() {
                        CloseReason::Idle
                    } else {
                        reason
                    };
                    return Poll::Ready(Ended::Closed(reason));
                }
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const D: Deadlines = Deadlines {
        handshake: Duration::from_secs(5),
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        write: Duration::from_secs(30),
    };

    fn snap(in_flight: usize, started: u64, read: u64) -> Snapshot {
        Snapshot {
            in_flight,
            started,
            read,
            h2: false,
            write_blocked_since: None,
        }
    }

    #[test]
    fn idle_then_head_then_busy_then_idle_again() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut w = Watch::new(D, t0);
        // Nothing sent: the idle bound.
        assert_eq!(w.check(s(1), snap(0, 0, 0)), Verdict::Wait(Some(s(60))));
        assert_eq!(
            w.check(s(60), snap(0, 0, 0)),
            Verdict::Expired(CloseReason::Idle)
        );
        // The first byte of a head: the header bound from then on, however long it trickles.
        let mut w = Watch::new(D, t0);
        assert_eq!(w.check(s(30), snap(0, 0, 3)), Verdict::Wait(Some(s(40))));
        assert_eq!(w.check(s(35), snap(0, 0, 9)), Verdict::Wait(Some(s(40))));
        assert_eq!(
            w.check(s(40), snap(0, 0, 12)),
            Verdict::Expired(CloseReason::HeaderTimeout)
        );
        // A request in flight (a long blob) has no read deadline at all.
        let mut w = Watch::new(D, t0);
        assert_eq!(w.check(s(1), snap(1, 1, 100)), Verdict::Wait(None));
        assert_eq!(w.check(s(5000), snap(1, 1, 100)), Verdict::Wait(None));
        // It ends: idle from then, and bytes read before do not count as the next head.
        assert_eq!(
            w.check(s(5001), snap(0, 1, 100)),
            Verdict::Wait(Some(s(5061)))
        );
        assert_eq!(
            w.check(s(5010), snap(0, 1, 101)),
            Verdict::Wait(Some(s(5020)))
        );
    }

    #[test]
    fn a_request_that_came_and_went_between_two_looks_restarts_the_idle_clock() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut w = Watch::new(D, t0);
        assert_eq!(w.check(s(1), snap(0, 0, 0)), Verdict::Wait(Some(s(60))));
        assert_eq!(w.check(s(50), snap(0, 1, 80)), Verdict::Wait(Some(s(110))));
    }

    #[test]
    fn http2_has_no_head_phase_and_writes_have_their_own_deadline() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut w = Watch::new(D, t0);
        let h2 = |read| Snapshot {
            h2: true,
            ..snap(0, 0, read)
        };
        // Pings and window updates between requests do not shorten the idle bound.
        assert_eq!(w.check(s(1), h2(24)), Verdict::Wait(Some(s(60))));
        assert_eq!(w.check(s(20), h2(60)), Verdict::Wait(Some(s(60))));
        // A blocked write during a response.
        let blocked = Snapshot {
            write_blocked_since: Some(s(100)),
            ..snap(1, 1, 10)
        };
        assert_eq!(w.check(s(101), blocked), Verdict::Wait(Some(s(130))));
        assert_eq!(
            w.check(s(130), blocked),
            Verdict::Expired(CloseReason::WriteTimeout)
        );
        // Whichever comes first wins.
        let mut w = Watch::new(D, t0);
        let idle_and_blocked = Snapshot {
            write_blocked_since: Some(s(50)),
            ..snap(0, 0, 0)
        };
        assert_eq!(w.check(s(51), idle_and_blocked), Verdict::Wait(Some(s(60))));
    }

    #[test]
    fn draining_gives_the_header_bound_after_the_last_request() {
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let mut w = Watch::new(D, t0);
        assert_eq!(
            w.check(s(60), snap(0, 0, 0)),
            Verdict::Expired(CloseReason::Idle)
        );
        w.drain(s(60));
        assert_eq!(w.check(s(61), snap(0, 0, 0)), Verdict::Wait(Some(s(70))));
        // A request that crossed the goodbye is let finish.
        assert_eq!(w.check(s(62), snap(1, 1, 30)), Verdict::Wait(None));
        assert_eq!(w.check(s(90), snap(0, 1, 30)), Verdict::Wait(Some(s(100))));
    }

    impl Reset for DuplexStream {
        fn reset_on_drop(&self) {}
    }

    type Served = tokio::task::JoinHandle<Ended>;

    fn serve_on(server: DuplexStream, body: fn() -> crate::origins::client::ProxyBody) -> Served {
        let service = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
            Ok::<_, Infallible>(Response::new(body()))
        });
        tokio::spawn(serve(server, service, D))
    }

    fn small() -> crate::origins::client::ProxyBody {
        crate::origins::client::full("ok")
    }

    fn closed(ended: Ended) -> CloseReason {
        match ended {
            Ended::Closed(r) => r,
            Ended::Served(r) => panic!("expected a deadline, the connection ended with {r:?}"),
        }
    }

    /// `f`, or a panic when it has not happened after an hour (of paused, auto-advanced time):
    /// a connection nobody closes fails the test instead of hanging it.
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(3600), f)
            .await
            .expect("nothing happened for an hour")
    }

    /// Reads until the server closes; returns what it sent.
    async fn until_closed(client: &mut DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        within(client.read_to_end(&mut out)).await.unwrap();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_the_idle_bound() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let start = Instant::now();
        let served = serve_on(server, small);
        assert!(until_closed(&mut client).await.is_empty());
        assert_eq!(closed(within(served).await.unwrap()), CloseReason::Idle);
        assert!(start.elapsed() >= D.idle);
        assert!(start.elapsed() < D.idle + D.header);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_head_is_closed_after_the_header_bound() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let served = serve_on(server, small);
        tokio::time::sleep(Duration::from_secs(20)).await;
        let start = Instant::now();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        // Trickling more bytes does not extend it.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            client.write_all(b"X-A: b\r\n").await.unwrap();
        }
        assert!(until_closed(&mut client).await.is_empty());
        assert_eq!(
            closed(within(served).await.unwrap()),
            CloseReason::HeaderTimeout
        );
        let took = start.elapsed();
        assert!(
            took >= D.header && took < D.header + Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_connections_are_closed_when_idle_after_a_request() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let served = serve_on(server, small);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 4096];
        let n = client.read(&mut buf).await.unwrap();
        let answered = Instant::now();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        // A second request on the same connection, 30 s later, is still served.
        tokio::time::sleep(Duration::from_secs(30)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let answered_again = Instant::now();
        assert!(until_closed(&mut client).await.is_empty());
        assert_eq!(closed(within(served).await.unwrap()), CloseReason::Idle);
        assert!(answered_again.elapsed() >= D.idle);
        assert!(answered.elapsed() >= D.idle + Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_a_long_response_is_closed() {
        // A small pipe: the response fills it and the server's write blocks.
        let (mut client, server) = tokio::io::duplex(16 << 10);
        let served = serve_on(server, || {
            let chunks = (0..1024).map(|_| {
                Ok::<_, crate::origins::client::BoxError>(Frame::data(Bytes::from(vec![
                    7u8;
                    64 << 10
                ])))
            });
            StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync()
        });
        client
            .write_all(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Read a little, slowly but steadily: a slow reader is not a stalled one.
        let mut buf = vec![0; 8 << 10];
        for _ in 0..8 {
            tokio::time::sleep(D.write / 2).await;
            assert!(client.read(&mut buf).await.unwrap() > 0);
        }
        assert!(!served.is_finished());
        // Then stop reading.
        tokio::time::sleep(D.write * 2).await;
        assert_eq!(
            closed(within(served).await.unwrap()),
            CloseReason::WriteTimeout
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_response_read_steadily_is_never_cut() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let served = serve_on(server, || {
            // One chunk every 20 s for far longer than every deadline together.
            let chunks = futures_util::stream::unfold(0, |i| async move {
                if i == 30 {
                    return None;
                }
                tokio::time::sleep(Duration::from_secs(20)).await;
                let chunk = Frame::data(Bytes::from_static(b"chunk"));
                Some((Ok::<_, crate::origins::client::BoxError>(chunk), i + 1))
            });
            StreamBody::new(chunks).boxed_unsync()
        });
        client
            .write_all(b"GET /blob HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let out = until_closed(&mut client).await;
        let text = String::from_utf8_lossy(&out);
        let ended = within(served).await.unwrap();
        assert_eq!(
            text.matches("\r\nchunk\r\n").count(),
            30,
            "{ended:?} {text}"
        );
        assert!(matches!(ended, Ended::Served(Ok(()))), "{ended:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_http2_connection_gets_a_goaway_and_is_closed() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let served = serve_on(server, small);
        client.write_all(H2_PREFACE).await.unwrap();
        // An empty SETTINGS frame; then only pings, which are no requests.
        client
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
            client.write_all(&ping).await.unwrap();
        }
        let out = until_closed(&mut client).await;
        // A GOAWAY frame (type 7) came before the close.
        assert!(
            out.windows(4).any(|w| w[3] == 7 && w[..3] == [0, 0, 8]),
            "no GOAWAY in {out:?}"
        );
        assert_eq!(closed(within(served).await.unwrap()), CloseReason::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_closing_normally_is_not_a_deadline() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let served = serve_on(server, small);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let out = until_closed(&mut client).await;
        assert!(out.starts_with(b"HTTP/1.1 200"));
        assert!(matches!(
            within(served).await.unwrap(),
            Ended::Served(Ok(()))
        ));
    }

    fn hello_service(
        _req: Request<Incoming>,
    ) -> std::future::Ready<Result<Response<crate::origins::client::ProxyBody>, Infallible>> {
        std::future::ready(Ok(Response::new(small())))
    }

    /// Why [`serve`] keeps its own clocks. hyper's HTTP/1 `header_read_timeout` (given a timer)
    /// starts when a keep-alive connection goes idle, so it is the idle bound too; and behind
    /// hyper-util's auto builder it never starts for a client that sends nothing, because the
    /// builder first reads the bytes that tell HTTP/2 from HTTP/1, with no deadline.
    #[tokio::test(start_paused = true)]
    async fn hypers_header_timeout_is_also_an_idle_bound_and_misses_the_version_sniff() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let conn = tokio::spawn(async move {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(
                    TokioIo::new(server),
                    hyper::service::service_fn(hello_service),
                )
                .await
        });
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 4096];
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let answered = Instant::now();
        // Not one byte of a next request, and still closed 10 s later: an idle bound.
        assert!(until_closed(&mut client).await.is_empty());
        let idle = answered.elapsed();
        assert!(
            idle >= Duration::from_secs(10) && idle < Duration::from_secs(11),
            "{idle:?}"
        );
        assert!(within(conn).await.unwrap().unwrap_err().is_timeout());

        let (_client, server) = tokio::io::duplex(64 << 10);
        let conn = tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            builder
                .serve_connection(
                    TokioIo::new(server),
                    hyper::service::service_fn(hello_service),
                )
                .await
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!conn.is_finished(), "a silent client is held for an hour");
    }
}
