//! Connection deadlines and limits with a real pullproxy. Hundreds of idle and stalled
//! connections of every kind, on the proxy port and the admin port, are each closed by the server
//! while real requests keep being served; the per-client budgets refuse direct connections and a
//! greedy redirected process while another runtime is served; and an exhausted descriptor table
//! makes accept back off, not spin, until pullproxy serves again.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use harness::{
    images::{self, Blob, Digest, Format},
    process::Proc,
    pullproxy::sample,
    require_root, testca,
    world::{ADMIN_ADDR, UPSTREAM_IP, World},
};
use rustls::{ClientConfig, ClientConnection, Stream};
use rustls_pki_types::ServerName;

/// The proxy port inside the node, as a local process would connect to it directly.
const PROXY_ADDR: &str = "127.0.0.1:15443";
/// The registry name direct TLS clients ask for.
const REGISTRY: &str = "registry-1.docker.io";
/// A repository on the hub.
const REPO: &str = "library/conn";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// Raises this test process's own soft open-file limit to its hard limit; panics if that is
/// still below `needed` (a machine too small for the test).
#[expect(unsafe_code, reason = "getrlimit/setrlimit: std has no wrapper")]
fn raise_own_fd_limit(needed: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one `rlimit` that outlives each call.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= needed,
        "this test holds {needed} sockets; the hard open-file limit is {}",
        lim.rlim_max
    );
}

/// `n` TCP connections to `to` from inside the node (unredirected: this process is in no
/// target cgroup), each with a read timeout so that a setup step cannot hang the test.
fn connect_many(w: &World, to: &str, n: usize) -> Vec<TcpStream> {
    let to = addr(to);
    w.node.ns.run_in(|| {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect(to).unwrap_or_else(|e| panic!("connect {to}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s
            })
            .collect()
    })
}

/// Whether the peer closed `tcp` (FIN or RST), found without reading from it: unread bytes the
/// server sent must stay unread (a client that stopped reading).
#[expect(
    unsafe_code,
    reason = "poll(2) for POLLRDHUP: std cannot ask without reading"
)]
fn closed_by_peer(tcp: &TcpStream) -> bool {
    let mut fd = libc::pollfd {
        fd: tcp.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; the socket outlives it.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n == 1 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Polls until every connection of every group was closed by the server; panics naming the
/// groups with connections still open after `within`.
fn wait_until_all_closed(
    groups: &[(&str, Vec<TcpStream>)],
    within: Duration,
    context: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + within;
    loop {
        let open: Vec<(&str, usize)> = groups
            .iter()
            .map(|(kind, conns)| (*kind, conns.iter().filter(|c| !closed_by_peer(c)).count()))
            .filter(|(_, n)| *n > 0)
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still open after {within:?} (kind, count): {open:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tls_config(w: &World, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = (*testca::client_config(&[&w.node.node_ca_pem()])).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn tls_client(config: &Arc<ClientConfig>) -> ClientConnection {
    ClientConnection::new(config.clone(), ServerName::try_from(REGISTRY).unwrap()).unwrap()
}

/// A completed TLS handshake with pullproxy as `registry-1.docker.io`.
fn handshake(tcp: &mut TcpStream, config: &Arc<ClientConfig>) -> ClientConnection {
    let mut tls = tls_client(config);
    while tls.is_handshaking() {
        tls.complete_io(tcp).expect("TLS handshake with pullproxy");
    }
    tls
}

/// Reads an HTTP/1 response head (through TLS or not).
fn read_head(r: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        r.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
fn h2_preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    out
}

/// A HEADERS frame (END_STREAM | END_HEADERS) on stream 1: `HEAD path` at `authority`, encoded
/// with HPACK literals without indexing (no Huffman).
fn h2_head_request(authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x02, 4];
    block.extend(b"HEAD"); // :method (static name 2)
    block.push(0x87); // :scheme https (static 7)
    block.extend([0x04, u8::try_from(path.len()).unwrap()]);
    block.extend(path.as_bytes()); // :path (static name 4)
    block.extend([0x01, u8::try_from(authority.len()).unwrap()]);
    block.extend(authority.as_bytes()); // :authority (static name 1)
    let len = u32::try_from(block.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], 0x1, 0x5, 0, 0, 0, 1];
    frame.extend(block);
    frame
}

/// Reads HTTP/2 frames until the response HEADERS of stream 1 ends the stream; returns the
/// first byte of its header block (0x88 is `:status: 200`, static index 8).
fn h2_response_status_byte(r: &mut impl Read) -> u8 {
    loop {
        let mut header = [0u8; 9];
        r.read_exact(&mut header).expect("HTTP/2 frame header");
        let len =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).expect("HTTP/2 frame payload");
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        if kind == 0x1 && stream == 1 {
            assert!(
                flags & 0x1 != 0,
                "a HEAD response ends its stream with its headers"
            );
            // No padding or priority flags from hyper's encoder.
            return payload[0];
        }
    }
}

/// Sets this socket's receive buffer small, so a response the client does not read blocks the
/// server's writes after a few kilobytes.
#[expect(unsafe_code, reason = "SO_RCVBUF: std has no setter for it")]
fn small_receive_buffer(tcp: &TcpStream) {
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt reads one c_int that outlives the call, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    sample(text, &format!("{name}{{{labels}}} "))
}

/// The `closed` counter of `listener` and `reason`.
fn closed(text: &str, listener: &str, reason: &str) -> f64 {
    metric(
        text,
        "pullproxy_connections_closed_total",
        &format!("listener=\"{listener}\",reason=\"{reason}\""),
    )
}

fn open(text: &str, listener: &str) -> f64 {
    metric(
        text,
        "pullproxy_connections_open",
        &format!("listener=\"{listener}\""),
    )
}

/// Polls `/metrics` until `pred` holds (or 60 s pass); returns the last scrape.
fn scrape_until(w: &World, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = w.scrape();
        if pred(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never reached in\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A blob on the hub, served through pullproxy.
fn hub_blob(w: &World, size: usize, seed: u8) -> Blob {
    let bytes: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let blob = Blob::from_bytes("application/octet-stream", bytes);
    w.hub.client().push_blob(REPO, &blob);
    blob
}

/// One real request through pullproxy (a blob GET, its bytes checked) and one `/metrics`.
fn served(w: &World, digest: &Digest) {
    let resp = w
        .direct()
        .get_blob(REPO, digest, None)
        .unwrap_or_else(|e| panic!("a blob GET through pullproxy failed: {e}"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(&Digest::of(&resp.body), digest);
    assert!(w.scrape().contains("pullproxy_connections_open"));
}

#[test]
fn hundreds_of_idle_and_stalled_connections_are_all_closed_while_pulls_go_on() {
    require_root!();
    const N: usize = 200;
    /// Connections that stop reading a large response (each costs pullproxy a hub download).
    const STALLED_READERS: usize = 40;
    raise_own_fd_limit(16 * N as u64);
    let deadline = Duration::from_secs(8);
    let secs = format!("{}s", deadline.as_secs());
    let w = World::with_proxy_env(
        "pp-conns",
        &[
            ("PULLPROXY_LISTEN__HANDSHAKE_TIMEOUT", secs.clone()),
            ("PULLPROXY_LISTEN__HEADER_TIMEOUT", secs.clone()),
            ("PULLPROXY_LISTEN__IDLE_TIMEOUT", secs.clone()),
            ("PULLPROXY_LISTEN__WRITE_TIMEOUT", secs.clone()),
            ("PULLPROXY_LISTEN__MAX_CONNECTIONS", "10000".into()),
            ("PULLPROXY_LISTEN__MAX_DIRECT_CONNECTIONS", "10000".into()),
            ("PULLPROXY_ADMIN__MAX_CONNECTIONS", "2000".into()),
            ("PULLPROXY_ADMIN__MAX_CONNECTIONS_PER_CLIENT", "2000".into()),
        ],
    );
    let limit = w
        .proxy
        .find("open file limit")
        .expect("the open file limit is logged");
    assert_eq!(limit["soft"], limit["hard"], "{limit}");
    let small = hub_blob(&w, 256 << 10, 1);
    let large = hub_blob(&w, 8 << 20, 2);
    let h1 = tls_config(&w, &[b"http/1.1"]);
    let h2 = tls_config(&w, &[b"h2"]);

    let setting_up = AtomicBool::new(true);
    let legit = AtomicUsize::new(0);
    let mut groups: Vec<(&str, Vec<TcpStream>)> = Vec::new();
    std::thread::scope(|s| {
        // Real requests all along, and twice more once everything is held.
        s.spawn(|| {
            let mut after = 0;
            while after < 2 {
                served(&w, &small.digest);
                legit.fetch_add(1, Ordering::Relaxed);
                if !setting_up.load(Ordering::Relaxed) {
                    after += 1;
                }
            }
        });

        // The kinds that cost a TLS handshake first, the cheap ones last, so that most are
        // open together.
        let mut conns = connect_many(&w, PROXY_ADDR, N);
        for c in &mut conns {
            handshake(c, &h1);
        }
        groups.push(("proxy: TLS done, no request", conns));

        let mut conns = connect_many(&w, PROXY_ADDR, N);
        for c in &mut conns {
            let mut tls = handshake(c, &h1);
            Stream::new(&mut tls, c)
                .write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {REGISTRY}\r\n").as_bytes())
                .unwrap();
        }
        groups.push(("proxy: partial request head", conns));

        let mut conns = connect_many(&w, PROXY_ADDR, N);
        let head = format!(
            "HEAD /v2/{REPO}/blobs/{} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n",
            small.digest
        );
        for c in &mut conns {
            let mut tls = handshake(c, &h1);
            let mut stream = Stream::new(&mut tls, c);
            stream.write_all(head.as_bytes()).unwrap();
            let response = read_head(&mut stream);
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        }
        groups.push(("proxy: keep-alive after one request", conns));

        let mut conns = connect_many(&w, PROXY_ADDR, N);
        for c in &mut conns {
            let mut tls = handshake(c, &h2);
            assert_eq!(tls.alpn_protocol(), Some(&b"h2"[..]));
            Stream::new(&mut tls, c).write_all(&h2_preface()).unwrap();
        }
        groups.push(("proxy: HTTP/2, no request", conns));

        let mut conns = connect_many(&w, PROXY_ADDR, N);
        let path = format!("/v2/{REPO}/blobs/{}", small.digest);
        for c in &mut conns {
            let mut tls = handshake(c, &h2);
            let mut stream = Stream::new(&mut tls, c);
            stream.write_all(&h2_preface()).unwrap();
            stream.write_all(&h2_head_request(REGISTRY, &path)).unwrap();
            assert_eq!(
                h2_response_status_byte(&mut stream),
                0x88,
                "HTTP/2 :status 200"
            );
        }
        groups.push(("proxy: HTTP/2 after one request", conns));

        let mut conns = connect_many(&w, PROXY_ADDR, STALLED_READERS);
        let get = format!(
            "GET /v2/{REPO}/blobs/{} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n",
            large.digest
        );
        for c in &mut conns {
            small_receive_buffer(c);
            let mut tls = handshake(c, &h1);
            Stream::new(&mut tls, c).write_all(get.as_bytes()).unwrap();
        }
        groups.push(("proxy: stopped reading a blob", conns));

        let conns = connect_many(&w, ADMIN_ADDR, N);
        groups.push(("admin: silent", conns));
        let mut conns = connect_many(&w, ADMIN_ADDR, N);
        for c in &mut conns {
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
        }
        groups.push(("admin: partial request head", conns));
        let mut conns = connect_many(&w, ADMIN_ADDR, N);
        for c in &mut conns {
            c.write_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let response = read_head(c);
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        }
        groups.push(("admin: keep-alive after one request", conns));

        let conns = connect_many(&w, PROXY_ADDR, N);
        groups.push(("proxy: silent", conns));
        let mut conns = connect_many(&w, PROXY_ADDR, N);
        let mut hello = Vec::new();
        tls_client(&h1).write_tls(&mut hello).unwrap();
        for c in &mut conns {
            c.write_all(&hello[..10]).unwrap();
        }
        groups.push(("proxy: partial ClientHello", conns));
        let mut conns = connect_many(&w, PROXY_ADDR, N);
        for c in &mut conns {
            let mut tls = tls_client(&h1);
            while tls.wants_write() {
                tls.write_tls(c).unwrap();
            }
        }
        groups.push(("proxy: ClientHello, then silence", conns));
        let mut conns = connect_many(&w, PROXY_ADDR, N);
        for c in &mut conns {
            c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: insecure.registry\r\n")
                .unwrap();
        }
        groups.push(("proxy: partial plain-HTTP head", conns));

        let text = w.scrape();
        let held = open(&text, "proxy");
        eprintln!(
            "held at once: {held} on the proxy port, {} on the admin port",
            open(&text, "admin")
        );
        // The cheap kinds were opened last, within one handshake deadline.
        assert!(held >= (2 * N) as f64, "{text}");
        setting_up.store(false, Ordering::Relaxed);
    });
    assert!(legit.load(Ordering::Relaxed) >= 3);

    let context = || w.scrape();
    wait_until_all_closed(&groups, Duration::from_secs(60), &context);

    // Every connection closed by the deadline that fits it, and nothing else.
    let text = scrape_until(&w, "every connection's place given back", |t| {
        open(t, "proxy") == 0.0
    });
    let n = N as f64;
    for (listener, reason, want) in [
        ("proxy", "peek_timeout", 3.0 * n),
        ("proxy", "handshake_timeout", n),
        ("proxy", "header_timeout", n),
        ("proxy", "idle", 4.0 * n),
        ("proxy", "write_timeout", STALLED_READERS as f64),
        ("admin", "idle", 2.0 * n),
        ("admin", "header_timeout", n),
    ] {
        assert_eq!(
            closed(&text, listener, reason),
            want,
            "{listener} {reason}:\n{text}"
        );
    }
    for reason in ["limit_global", "limit_client", "limit_direct"] {
        assert_eq!(closed(&text, "proxy", reason), 0.0, "{reason}");
    }
    assert_eq!(sample(&text, "pullproxy_accept_errors_total"), 0.0);
    // Still serving.
    served(&w, &small.digest);
}

/// Starts bash in the node's runtime cgroup (so the kernel redirects its connections to
/// pullproxy) holding `n` connections to the fake Docker Hub; returns once all are connected.
fn hold_redirected(w: &World, n: usize) -> Proc {
    let script = format!(
        "for i in $(seq 1 {n}); do exec {{fd}}<>/dev/tcp/{UPSTREAM_IP}/443 || exit 1; done; \
         echo connected; exec sleep 600"
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]).stdout(Stdio::piped());
    let mut proc = Proc::spawn(cmd, Some(&w.node.ns), Some(&w.node.runtime));
    let mut line = String::new();
    BufReader::new(proc.child_mut().stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "connected",
        "bash could not open {n} connections"
    );
    proc
}

#[test]
fn direct_connections_and_a_greedy_runtime_are_held_to_their_budgets() {
    require_root!();
    // Long deadlines: every held connection stays until the test lets it go.
    let long = "300s".to_owned();
    let w = World::with_proxy_env(
        "pp-conns",
        &[
            ("PULLPROXY_LISTEN__HANDSHAKE_TIMEOUT", long.clone()),
            ("PULLPROXY_LISTEN__IDLE_TIMEOUT", long.clone()),
            ("PULLPROXY_LISTEN__MAX_CONNECTIONS", "30".into()),
            ("PULLPROXY_LISTEN__MAX_CONNECTIONS_PER_CLIENT", "10".into()),
            ("PULLPROXY_LISTEN__MAX_DIRECT_CONNECTIONS", "10".into()),
        ],
    );
    let image = images::busybox(Format::Docker);
    w.hub
        .client()
        .push_image("library/busybox", "latest", &image);
    let counts = |t: &str| {
        (
            open(t, "proxy"),
            closed(t, "proxy", "limit_direct"),
            closed(t, "proxy", "limit_client"),
            closed(t, "proxy", "limit_global"),
        )
    };

    // Local processes connecting directly: ten are held, the next five closed at once.
    let direct = connect_many(&w, PROXY_ADDR, 10);
    scrape_until(&w, "ten direct connections held", |t| {
        open(t, "proxy") == 10.0
    });
    let refused = connect_many(&w, PROXY_ADDR, 5);
    wait_until_all_closed(
        &[("direct over budget", refused)],
        Duration::from_secs(30),
        &|| w.scrape(),
    );
    assert!(
        direct.iter().all(|c| !closed_by_peer(c)),
        "the held ones stay"
    );
    let text = w.scrape();
    assert_eq!(counts(&text), (10.0, 5.0, 0.0, 0.0), "{text}");

    // One runtime process opening fifteen: ten held, five refused, and it is named in a warning.
    let greedy = hold_redirected(&w, 15);
    let text = scrape_until(&w, "the greedy runtime's refusals", |t| {
        closed(t, "proxy", "limit_client") == 5.0 && open(t, "proxy") == 20.0
    });
    assert_eq!(counts(&text), (20.0, 5.0, 5.0, 0.0), "{text}");
    let warning = w.proxy.wait_for(
        "connection refused: over the connection limit",
        Duration::from_secs(30),
        |r| r["pid"] == u64::from(greedy.pid()) && r["reason"] == "limit_client",
    );
    assert!(warning.is_some(), "no warning naming pid {}", greedy.pid());

    // The listener fills up: a second process gets ten, a third none.
    let second = hold_redirected(&w, 10);
    scrape_until(&w, "the listener full", |t| open(t, "proxy") == 30.0);
    let third = hold_redirected(&w, 5);
    let text = scrape_until(&w, "the full listener's refusals", |t| {
        closed(t, "proxy", "limit_global") == 5.0
    });
    assert_eq!(counts(&text), (30.0, 5.0, 5.0, 5.0), "{text}");

    // With room again, a runtime pulls an image while the direct budget is used up and the
    // greedy process holds all its share.
    drop((second, third));
    scrape_until(&w, "the others' places given back", |t| {
        open(t, "proxy") == 20.0
    });
    let dest = tempfile::tempdir().unwrap();
    w.skopeo()
        .copy_to_dir(
            "docker://registry-1.docker.io/library/busybox:latest",
            dest.path(),
            None,
            false,
        )
        .expect_success();
    harness::skopeo::verify_dir_copy(dest.path(), &image).unwrap();
    let text = w.scrape();
    assert_eq!(closed(&text, "proxy", "limit_direct"), 5.0, "{text}");
    assert_eq!(closed(&text, "proxy", "limit_client"), 5.0, "{text}");
    assert!(direct.iter().all(|c| !closed_by_peer(c)));
    drop(greedy);
}

/// Open descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn out_of_descriptors_accept_backs_off_and_serving_resumes() {
    require_root!();
    let w = World::with_proxy_env(
        "pp-conns",
        &[
            ("PULLPROXY_LISTEN__HANDSHAKE_TIMEOUT", "300s".into()),
            ("PULLPROXY_LISTEN__MAX_DIRECT_CONNECTIONS", "4096".into()),
        ],
    );
    let blob = hub_blob(&w, 256 << 10, 3);
    served(&w, &blob.digest);
    // Leave pullproxy thirty descriptors, then open more connections than that.
    let pid = w.proxy.pid();
    let fds = open_fds(pid) + 30;
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={fds}:{fds}")])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let held = connect_many(&w, PROXY_ADDR, 60);
    let failing = w.proxy.wait_for(
        "accept failed; backing off until it succeeds",
        Duration::from_secs(30),
        |r| r["listener"] == "proxy",
    );
    assert!(failing.is_some(), "accept never failed");
    // Let it fail for a while, then give the descriptors back.
    std::thread::sleep(Duration::from_secs(3));
    drop(held);
    let again = w.proxy.wait_for(
        "accepting connections again",
        Duration::from_secs(30),
        |r| r["listener"] == "proxy",
    );
    let failing_for = started.elapsed();
    assert!(again.is_some(), "never accepted again");
    served(&w, &blob.digest);
    // Backing off: at most a handful of tries in the first second (5 ms doubling), then one a
    // second. A loop retrying at once would have failed many thousands of times.
    let text = w.scrape();
    let errors = metric(
        &text,
        "pullproxy_accept_errors_total",
        "listener=\"proxy\",reason=\"fd_limit\"",
    );
    assert!(
        errors >= 1.0 && errors <= 10.0 + failing_for.as_secs_f64(),
        "{errors} failed accepts in {failing_for:?}"
    );
}
