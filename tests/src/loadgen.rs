//! The benchmark client: the one HTTP client every measured system is pulled with. Keep-alive
//! HTTP/1.1 over plain TCP or TLS (rustls, trusting the CA bundle the process sees), any number
//! of connections on threads that connect and finish their handshakes first and then start
//! together, every request timed, bodies read with one copy into a reused buffer (or hashed, to
//! check them).
//!
//! It runs as a process of its own ([`Job::run_at`] starts the calling binary with
//! [`CLIENT_ARG`], which calls [`client_main`]), so a [`Placement`] puts it where a container
//! runtime would be: a cgroup (redirected by the kernel programs or not), the node's network
//! namespace, and a mount namespace whose hosts file and CA bundle say which registry a name
//! means and whom to trust.
//!
//! rustls reads at most 4 KiB per `read` call on its transport; the TLS transport here is a
//! read-buffered socket so that a 1 GiB body is not a quarter of a million `read(2)` calls in
//! the client (which would make the client, not the server, the bottleneck). For the same
//! reason TLS bodies are hashed or counted where rustls holds the decrypted record
//! (`BufRead::fill_buf`), not copied out into a buffer first: rustls itself copies each record's
//! plaintext once, which it offers no way around.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{TcpStream, ToSocketAddrs},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    mountns::CA_BUNDLE_PATHS,
    process::{Placement, Proc},
    registry_client::{self, Response},
};

/// The first argument that makes a benchmark binary act as a client ([`client_main`]).
pub const CLIENT_ARG: &str = "client";

/// Socket receive buffer of the TLS transport, and the body buffer.
const READ_BUF: usize = 256 * 1024;

/// What one client process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// `https://registry-1.docker.io` or `http://sealos.hub:5000`; the name is resolved by the
    /// process's own resolver (its hosts file).
    pub base: String,
    /// Basic-auth credentials sent with every request.
    pub basic_auth: Option<(String, String)>,
    /// `GET` or `HEAD`.
    pub method: String,
    /// Extra request headers (`Accept` for manifests).
    pub headers: Vec<(String, String)>,
    /// Paths each connection requests in order, `repeat` times over.
    pub paths: Vec<String>,
    pub repeat: usize,
    /// Untimed requests of the first path on each connection before the common start.
    pub warmup: usize,
    /// Connections, one thread each.
    pub connections: usize,
    /// Hash bodies and compare them with the digest that ends the path (blobs).
    pub verify: bool,
    /// Deadline of each socket operation.
    pub timeout_s: f64,
}

impl Job {
    /// `GET` (or `HEAD`) of `paths` on one connection, once, with a generous timeout.
    pub fn new(base: &str, method: &str, paths: Vec<String>) -> Self {
        Self {
            base: base.to_owned(),
            basic_auth: None,
            method: method.to_owned(),
            headers: Vec::new(),
            paths,
            repeat: 1,
            warmup: 0,
            connections: 1,
            verify: false,
            timeout_s: 120.0,
        }
    }

    /// Runs the job in a child process (`program client`) placed at `at`; panics with the
    /// child's exit status if it produced no outcome.
    pub fn run_at(&self, program: &Path, at: &Placement) -> Outcome {
        let mut cmd = Command::new(program);
        cmd.arg(CLIENT_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn_at(cmd, at);
        let child = proc.child_mut();
        let job = serde_json::to_vec(self).expect("job JSON");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&job)
            .expect("send the job to the client");
        let mut out = Vec::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_end(&mut out)
            .expect("read the client's outcome");
        let status = child.wait().expect("wait for the client");
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "benchmark client ({status}) printed no outcome ({e}): {}",
                String::from_utf8_lossy(&out)
            )
        })
    }
}

/// One timed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    pub conn: usize,
    /// When the request was sent, from the start of the first request.
    pub start_s: f64,
    /// Until the last byte of the body.
    pub secs: f64,
    pub status: u16,
    pub bytes: u64,
}

/// What a job measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// From the start of the first request to the end of the last.
    pub wall_s: f64,
    /// The slowest connect plus handshake (before the common start).
    pub connect_s: f64,
    pub requests: Vec<Timing>,
    /// Failed requests (I/O errors, digest mismatches), with the connection's number.
    pub errors: Vec<String>,
}

impl Outcome {
    /// Body bytes of every timed request.
    pub fn bytes(&self) -> u64 {
        self.requests.iter().map(|r| r.bytes).sum()
    }

    /// Per-request durations in seconds.
    pub fn durations(&self) -> Vec<f64> {
        self.requests.iter().map(|r| r.secs).collect()
    }

    /// Panics unless every request succeeded with `status` and, if given, `bytes` each.
    pub fn expect(&self, what: &str, status: u16, bytes: Option<u64>) -> &Self {
        assert!(self.errors.is_empty(), "{what}: {:?}", self.errors);
        for r in &self.requests {
            assert_eq!(r.status, status, "{what}: request on connection {}", r.conn);
            if let Some(b) = bytes {
                assert_eq!(r.bytes, b, "{what}: body size on connection {}", r.conn);
            }
        }
        self
    }
}

/// The entry point of the client process: a [`Job`] as JSON on stdin, the [`Outcome`] as JSON
/// on stdout.
pub fn client_main() {
    let mut input = Vec::new();
    io::stdin().read_to_end(&mut input).expect("read job");
    let job: Job = serde_json::from_slice(&input).expect("job JSON");
    let outcome = run(&job);
    println!("{}", serde_json::to_string(&outcome).expect("outcome JSON"));
}

/// Runs `job` in this process.
pub fn run(job: &Job) -> Outcome {
    let target = Arc::new(Target::new(job));
    let barrier = Arc::new(Barrier::new(job.connections + 1));
    let threads: Vec<_> = (0..job.connections)
        .map(|conn| {
            let (target, barrier, job) = (target.clone(), barrier.clone(), job.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || connection(conn, &target, &barrier, &job))
                .expect("spawn client thread")
        })
        .collect();
    barrier.wait();
    let mut out = Outcome::default();
    let mut raw = Vec::new();
    for t in threads {
        let (connect, timings, errors) = t.join().expect("client thread panicked");
        out.connect_s = out.connect_s.max(connect);
        raw.extend(timings);
        out.errors.extend(errors);
    }
    // The common start is the first request's start: the client threads leave the barrier before
    // or after this thread does, as the scheduler decides, so no clock read here bounds them.
    let Some(t0) = raw.iter().map(|r| r.1).min() else {
        return out;
    };
    let end = raw.iter().map(|r| r.2).max().unwrap_or(t0);
    for (conn, start, finish, status, bytes) in raw {
        out.requests.push(Timing {
            conn,
            start_s: (start - t0).as_secs_f64(),
            secs: (finish - start).as_secs_f64(),
            status,
            bytes,
        });
    }
    out.wall_s = (end - t0).as_secs_f64();
    out
}

type RawTiming = (usize, Instant, Instant, u16, u64);

/// One connection's thread: connect and warm up, wait for the start, run the requests.
fn connection(
    conn: usize,
    target: &Target,
    barrier: &Barrier,
    job: &Job,
) -> (f64, Vec<RawTiming>, Vec<String>) {
    let mut errors = Vec::new();
    let started = Instant::now();
    let mut c = match Conn::open(target) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.push(format!("connection {conn}: connect: {e}"));
            None
        }
    };
    let connect = started.elapsed().as_secs_f64();
    let mut buf = vec![0u8; READ_BUF];
    let heads: Vec<Vec<u8>> = job.paths.iter().map(|p| target.head(job, p)).collect();
    if let Some(c) = c.as_mut() {
        for _ in 0..job.warmup {
            if let Err(e) = c.request(target, job.method == "HEAD", &heads[0], None, &mut buf) {
                errors.push(format!("connection {conn}: warm-up: {e}"));
                break;
            }
        }
    }
    barrier.wait();
    let mut timings = Vec::with_capacity(job.paths.len() * job.repeat);
    let Some(mut c) = c else {
        return (connect, timings, errors);
    };
    for _ in 0..job.repeat {
        for (path, head) in job.paths.iter().zip(&heads) {
            let digest = job.verify.then(|| digest_of_path(path)).flatten();
            let start = Instant::now();
            match c.request(target, job.method == "HEAD", head, digest, &mut buf) {
                Ok((status, bytes)) => timings.push((conn, start, Instant::now(), status, bytes)),
                Err(e) => errors.push(format!("connection {conn}: {path}: {e}")),
            }
        }
    }
    (connect, timings, errors)
}

/// `sha256:<hex>` at the end of a blob path.
fn digest_of_path(path: &str) -> Option<&str> {
    path.rsplit('/').next().filter(|d| d.starts_with("sha256:"))
}

/// Where the client connects and how.
struct Target {
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    tls: Option<Arc<ClientConfig>>,
    auth: Option<String>,
    timeout: Duration,
}

impl Target {
    fn new(job: &Job) -> Self {
        let (tls, rest) = if let Some(rest) = job.base.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = job.base.strip_prefix("http://") {
            (false, rest)
        } else {
            panic!("base {:?} is neither http:// nor https://", job.base)
        };
        let authority = rest.trim_end_matches('/').to_owned();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().expect("port")),
            None => (authority.clone(), if tls { 443 } else { 80 }),
        };
        Self {
            host,
            port,
            authority,
            tls: tls.then(system_roots),
            auth: job.basic_auth.as_ref().map(|(u, p)| {
                format!(
                    "Basic {}",
                    registry_client::base64(format!("{u}:{p}").as_bytes())
                )
            }),
            timeout: Duration::from_secs_f64(job.timeout_s),
        }
    }

    /// The request head for `path`.
    fn head(&self, job: &Job, path: &str) -> Vec<u8> {
        let mut h = format!(
            "{} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pullproxy-bench\r\n",
            job.method, self.authority
        );
        if let Some(auth) = &self.auth {
            h += &format!("Authorization: {auth}\r\n");
        }
        for (k, v) in &job.headers {
            h += &format!("{k}: {v}\r\n");
        }
        h += "\r\n";
        h.into_bytes()
    }
}

/// A rustls configuration trusting the first system CA bundle this process sees (in a private
/// mount namespace: the bundle mounted over it).
fn system_roots() -> Arc<ClientConfig> {
    let pem = CA_BUNDLE_PATHS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .unwrap_or_else(|| panic!("no CA bundle at any of {CA_BUNDLE_PATHS:?}"));
    let mut roots = RootCertStore::empty();
    let (added, _ignored) =
        roots.add_parsable_certificates(CertificateDer::pem_slice_iter(&pem).flatten());
    assert!(added > 0, "no usable certificate in the CA bundle");
    Arc::new(
        ClientConfig::builder_with_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A socket whose reads are buffered (rustls reads 4 KiB at a time) and whose writes are not.
struct BufferedSocket(BufReader<TcpStream>);

impl Read for BufferedSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for BufferedSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, BufferedSocket>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Transport {
    /// Up to `max` body bytes handed to `f`: read into `buf` from a plain socket, or where
    /// rustls decrypted them. Returns how many (0 at the end of the stream).
    fn read_with(
        &mut self,
        buf: &mut [u8],
        max: usize,
        f: impl FnOnce(&[u8]),
    ) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => {
                let want = buf.len().min(max);
                let n = s.read(&mut buf[..want])?;
                f(&buf[..n]);
                Ok(n)
            }
            Transport::Tls(s) => {
                let chunk = s.fill_buf()?;
                let n = chunk.len().min(max);
                f(&chunk[..n]);
                s.consume(n);
                Ok(n)
            }
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

/// A keep-alive connection; re-opened when the server closes it.
struct Conn {
    io: Option<BufReader<Transport>>,
    /// Requests answered on the current connection.
    served: usize,
}

impl Conn {
    fn open(target: &Target) -> io::Result<Self> {
        let mut c = Conn {
            io: None,
            served: 0,
        };
        c.connect(target)?;
        Ok(c)
    }

    /// Connects (and completes the TLS handshake, so that it is not timed with a request).
    fn connect(&mut self, target: &Target) -> io::Result<()> {
        self.io = None;
        self.served = 0;
        let addr = (target.host.as_str(), target.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        let tcp = TcpStream::connect_timeout(&addr, target.timeout)?;
        tcp.set_read_timeout(Some(target.timeout))?;
        tcp.set_write_timeout(Some(target.timeout))?;
        tcp.set_nodelay(true)?;
        let transport = match &target.tls {
            None => Transport::Plain(tcp),
            Some(config) => {
                let name = ServerName::try_from(target.host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
                let mut s = StreamOwned::new(
                    conn,
                    BufferedSocket(BufReader::with_capacity(READ_BUF, tcp)),
                );
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                Transport::Tls(Box::new(s))
            }
        };
        self.io = Some(BufReader::with_capacity(64 * 1024, transport));
        Ok(())
    }

    /// Sends one request and reads the whole response; (status, body bytes). A request on a
    /// reused connection that the server had closed is retried once on a new one.
    fn request(
        &mut self,
        target: &Target,
        head_only: bool,
        head: &[u8],
        verify: Option<&str>,
        buf: &mut [u8],
    ) -> io::Result<(u16, u64)> {
        if self.io.is_none() {
            self.connect(target)?;
        }
        let reused = self.served > 0;
        let resp = match self.send(head) {
            Err(e) if reused && is_closed(&e) => {
                self.connect(target)?;
                self.send(head)?
            }
            other => other?,
        };
        let io = self.io.as_mut().expect("connected");
        let mut hasher = verify.map(|_| Sha256::new());
        let mut close = resp
            .header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut bytes = 0;
        if registry_client::has_body(&resp, head_only) {
            if registry_client::is_chunked(&resp) {
                let mut sink = Sink {
                    bytes: 0,
                    hasher: hasher.as_mut(),
                };
                registry_client::read_chunked(io, &mut sink)?;
                bytes = sink.bytes;
            } else if let Some(len) = registry_client::content_length(&resp)? {
                bytes = read_body(io, len, buf, hasher.as_mut())?;
            } else {
                bytes = io::copy(
                    io,
                    &mut Sink {
                        bytes: 0,
                        hasher: hasher.as_mut(),
                    },
                )?;
                close = true;
            }
        }
        if let (Some(want), Some(h)) = (verify, hasher) {
            let got = format!("sha256:{}", hex(&h.finalize()));
            if resp.status == 200 && got != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("body hashes to {got}"),
                ));
            }
        }
        self.served += 1;
        if close {
            self.io = None;
        }
        Ok((resp.status, bytes))
    }

    fn send(&mut self, head: &[u8]) -> io::Result<Response> {
        let io = self.io.as_mut().expect("connected");
        let t = io.get_mut();
        t.write_all(head)?;
        t.flush()?;
        registry_client::read_head(io)
    }
}

/// Whether an error means the server had closed a kept-alive connection.
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Reads exactly `len` body bytes: what the head's buffer already holds, then straight from the
/// transport (a plain socket into `buf`; TLS where rustls decrypted them).
fn read_body(
    io: &mut BufReader<Transport>,
    len: u64,
    buf: &mut [u8],
    mut hasher: Option<&mut Sha256>,
) -> io::Result<u64> {
    let mut left = len;
    let buffered = io.buffer();
    let n = buffered.len().min(left as usize);
    if let Some(h) = hasher.as_mut() {
        h.update(&buffered[..n]);
    }
    io.consume(n);
    left -= n as u64;
    while left > 0 {
        let max = usize::try_from(left).unwrap_or(usize::MAX);
        let n = io.get_mut().read_with(buf, max, |bytes| {
            if let Some(h) = hasher.as_mut() {
                h.update(bytes);
            }
        })?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body ended after {} of {len} bytes", len - left),
            ));
        }
        left -= n as u64;
    }
    Ok(len)
}

/// Counts (and optionally hashes) what is written to it.
struct Sink<'a> {
    bytes: u64,
    hasher: Option<&'a mut Sha256>,
}

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes += buf.len() as u64;
        if let Some(h) = self.hasher.as_mut() {
            h.update(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A server that answers each request on a connection with `body` and closes the
    /// connection after `per_conn` responses.
    fn server(body: &'static [u8], per_conn: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(stream.try_clone().unwrap());
                    let mut w = stream;
                    for i in 0..per_conn {
                        let mut line = String::new();
                        let mut head_only = false;
                        loop {
                            line.clear();
                            if r.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            head_only |= line.starts_with("HEAD ");
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let close = if i + 1 == per_conn {
                            "Connection: close\r\n"
                        } else {
                            ""
                        };
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{close}\r\n",
                            body.len()
                        );
                        if !head_only {
                            let _ = w.write_all(body);
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn requests_are_timed_and_bodies_counted_across_reconnects() {
        let body: &'static [u8] = b"0123456789abcdef";
        let addr = server(body, 2);
        let digest = format!("sha256:{}", hex(&Sha256::digest(body)));
        let mut job = Job::new(
            &format!("http://{addr}"),
            "GET",
            vec![format!("/v2/x/blobs/{digest}")],
        );
        job.repeat = 5;
        job.connections = 3;
        job.verify = true;
        let out = run(&job);
        out.expect("GET", 200, Some(body.len() as u64));
        assert_eq!(out.requests.len(), 15);
        assert_eq!(out.bytes(), 15 * body.len() as u64);
        assert!(out.wall_s >= out.requests.iter().map(|r| r.secs).fold(0.0, f64::max));

        job.method = "HEAD".into();
        job.verify = false;
        let out = run(&job);
        out.expect("HEAD", 200, Some(0));
    }

    #[test]
    fn a_body_that_does_not_match_its_digest_is_an_error() {
        let addr = server(b"not what was asked for", 10);
        let mut job = Job::new(
            &format!("http://{addr}"),
            "GET",
            vec![format!("/v2/x/blobs/sha256:{}", "0".repeat(64))],
        );
        job.verify = true;
        let out = run(&job);
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert!(out.errors[0].contains("hashes to"), "{:?}", out.errors);
    }
}
