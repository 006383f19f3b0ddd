//! A small blocking client of the distribution (OCI registry) API for tests: push images, fetch
//! manifests and blobs, over plain HTTP or TLS with a test CA, with basic auth, from inside a
//! test's network namespace. One connection per request (`Connection: close`): simple and
//! plenty for setting up and checking, not a load generator.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

use crate::{
    images::{Blob, Digest, Image, Index, MEDIA_TYPES},
    netns::NetNs,
};

/// A request body.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// Streamed from a file (big blobs).
    File(&'a Path),
}

/// A response; `body` is empty when it was streamed to a sink instead.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One registry as a client sees it: the name it asks for (SNI, `Host`) and the address it
/// actually connects to, which may exist only inside a test network namespace.
#[derive(Clone)]
pub struct RegistryClient {
    server_name: String,
    addr: SocketAddr,
    netns: Option<PathBuf>,
    tls: Option<Arc<ClientConfig>>,
    /// The `Authorization` header value sent with every request.
    authorization: Option<String>,
    user_agent: String,
    timeout: Duration,
}

impl RegistryClient {
    /// Plain HTTP to `addr`, asking for `server_name` (`registry-1.docker.io`, `sealos.hub`).
    pub fn new(server_name: &str, addr: SocketAddr) -> Self {
        Self {
            server_name: server_name.to_owned(),
            addr,
            netns: None,
            tls: None,
            authorization: None,
            user_agent: "pullproxy-harness".to_owned(),
            timeout: Duration::from_secs(60),
        }
    }

    /// TLS with these roots (e.g. [`crate::testca::TestCa::client_config`]).
    pub fn tls(mut self, config: Arc<ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Basic auth on every request.
    pub fn creds(mut self, user: &str, password: &str) -> Self {
        self.authorization = Some(format!(
            "Basic {}",
            base64(format!("{user}:{password}").as_bytes())
        ));
        self
    }

    /// No `Authorization` header.
    pub fn anonymous(mut self) -> Self {
        self.authorization = None;
        self
    }

    /// Connects from inside `netns`.
    pub fn netns(mut self, netns: &NetNs) -> Self {
        self.netns = Some(netns.path());
        self
    }

    /// Connects from inside the network namespace at `path` (`None`: this process's).
    pub fn netns_path(mut self, path: Option<PathBuf>) -> Self {
        self.netns = path;
        self
    }

    /// The `User-Agent` (the registry's access log shows it; see [`crate::registry::Registry`]).
    pub fn user_agent(mut self, ua: &str) -> Self {
        self.user_agent = ua.to_owned();
        self
    }

    /// Connect, read and write deadline per operation (default 60 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://registry-1.docker.io` (the port only when it is not the scheme's default).
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.authority())
    }

    fn authority(&self) -> String {
        let default = if self.tls.is_some() { 443 } else { 80 };
        if self.addr.port() == default {
            self.server_name.clone()
        } else {
            format!("{}:{}", self.server_name, self.addr.port())
        }
    }

    /// Sends one request and reads the whole response into memory.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> io::Result<Response> {
        let mut buf = Vec::new();
        let mut resp = self.request_to(method, path, headers, body, &mut buf)?;
        resp.body = buf;
        Ok(resp)
    }

    /// Sends one request and streams the response body into `sink` (`Response::body` stays
    /// empty): for big blobs.
    pub fn request_to(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        sink: &mut dyn Write,
    ) -> io::Result<Response> {
        let tcp = self.connect()?;
        tcp.set_read_timeout(Some(self.timeout))?;
        tcp.set_write_timeout(Some(self.timeout))?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = ServerName::try_from(self.server_name.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
                Box::new(StreamOwned::new(conn, tcp))
            }
        };
        let mut stream = BufReader::with_capacity(64 * 1024, stream);
        self.write_request(stream.get_mut(), method, path, headers, body)?;
        read_response(&mut stream, method == "HEAD", sink)
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let Some(path) = &self.netns else {
            return TcpStream::connect_timeout(&self.addr, self.timeout);
        };
        let ns = File::open(path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd affects only this short-lived thread;
                // the socket keeps the namespace for its whole life.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                TcpStream::connect_timeout(&self.addr, self.timeout)
            })
            .join()
            .expect("connect thread panicked")
        })
    }

    fn write_request(
        &self,
        stream: &mut dyn Stream,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
    ) -> io::Result<()> {
        let mut out = BufWriter::with_capacity(256 * 1024, stream);
        write!(
            out,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nConnection: close\r\n",
            self.authority(),
            self.user_agent
        )?;
        if let Some(authorization) = &self.authorization {
            write!(out, "Authorization: {authorization}\r\n")?;
        }
        for (k, v) in headers {
            write!(out, "{k}: {v}\r\n")?;
        }
        let len = match body {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File(p) => std::fs::metadata(p)?.len(),
        };
        if len > 0 || !matches!(method, "GET" | "HEAD" | "DELETE") {
            write!(out, "Content-Length: {len}\r\n")?;
        }
        out.write_all(b"\r\n")?;
        match body {
            Body::Empty => {}
            Body::Bytes(b) => out.write_all(b)?,
            Body::File(p) => {
                io::copy(&mut File::open(p)?, &mut out)?;
            }
        }
        out.flush()
    }

    /// A TLS connection kept open for several requests (the client must have a TLS
    /// configuration): for tests of what happens on one connection.
    pub fn keep_alive(&self) -> io::Result<KeepAlive> {
        let config = self.tls.clone().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "keep-alive is for TLS clients")
        })?;
        let tcp = self.connect()?;
        tcp.set_read_timeout(Some(self.timeout))?;
        tcp.set_write_timeout(Some(self.timeout))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(KeepAlive {
            io: BufReader::with_capacity(64 * 1024, stream),
            authority: self.authority(),
            authorization: self.authorization.clone(),
        })
    }

    /// `GET /v2/`: the status (200, or 401 when credentials are needed or wrong).
    pub fn ping(&self) -> io::Result<u16> {
        Ok(self.request("GET", "/v2/", &[], Body::Empty)?.status)
    }

    /// `GET` a manifest by tag or digest, accepting every manifest type the harness knows.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> io::Result<Response> {
        let accept = MEDIA_TYPES.join(", ");
        self.request(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", &accept)],
            Body::Empty,
        )
    }

    /// `HEAD` a manifest: its `Docker-Content-Digest` without the body.
    pub fn head_manifest(&self, repo: &str, reference: &str) -> io::Result<Response> {
        let accept = MEDIA_TYPES.join(", ");
        self.request(
            "HEAD",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", &accept)],
            Body::Empty,
        )
    }

    /// `GET` a blob into memory; `range` is a `Range` header value (`bytes=10-`).
    pub fn get_blob(
        &self,
        repo: &str,
        digest: &Digest,
        range: Option<&str>,
    ) -> io::Result<Response> {
        let headers: Vec<(&str, &str)> = range.map(|r| ("Range", r)).into_iter().collect();
        self.request(
            "GET",
            &format!("/v2/{repo}/blobs/{digest}"),
            &headers,
            Body::Empty,
        )
    }

    /// Whether the registry has the blob in `repo` (`HEAD`, 200).
    pub fn has_blob(&self, repo: &str, digest: &Digest) -> io::Result<bool> {
        let r = self.request(
            "HEAD",
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            Body::Empty,
        )?;
        Ok(r.status == 200)
    }

    /// `GET /v2/_catalog`: the repositories the registry holds (up to 1000, distribution's
    /// default page limit).
    pub fn catalog(&self) -> io::Result<Vec<String>> {
        let r = self.request("GET", "/v2/_catalog?n=1000", &[], Body::Empty)?;
        list_field(&r, "repositories")
    }

    /// `GET /v2/<repo>/tags/list`: the repository's tags (none when the registry does not know
    /// the repository).
    pub fn tags(&self, repo: &str) -> io::Result<Vec<String>> {
        let r = self.request("GET", &format!("/v2/{repo}/tags/list"), &[], Body::Empty)?;
        if r.status == 404 {
            return Ok(Vec::new());
        }
        list_field(&r, "tags")
    }

    /// What of `image` the registry lacks in `repo`: its manifest (by digest) and each blob it
    /// does not have, in that order; empty when it holds the whole image.
    pub fn missing(&self, repo: &str, image: &Image) -> io::Result<Vec<Digest>> {
        let mut missing = Vec::new();
        if self.head_manifest(repo, image.digest().as_str())?.status != 200 {
            missing.push(image.digest().clone());
        }
        for blob in image.blobs() {
            if !self.has_blob(repo, &blob.digest)? {
                missing.push(blob.digest.clone());
            }
        }
        Ok(missing)
    }

    /// Uploads `blob` to `repo` unless it is there: `POST /v2/<repo>/blobs/uploads/`, then one
    /// monolithic `PUT <location>&digest=`. Panics with the registry's answer on failure.
    pub fn push_blob(&self, repo: &str, blob: &Blob) {
        if self.has_blob(repo, &blob.digest).unwrap_or(false) {
            return;
        }
        let start = self.expect(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Body::Empty,
            202,
        );
        let location = start
            .header("Location")
            .unwrap_or_else(|| panic!("upload to {repo} started without a Location"));
        let mut target = path_of(location).to_owned();
        target.push(if target.contains('?') { '&' } else { '?' });
        target.push_str(&format!("digest={}", blob.digest));
        let headers = [("Content-Type", "application/octet-stream")];
        let body = match &blob.content {
            crate::images::Content::Bytes(b) => Body::Bytes(b),
            crate::images::Content::File(p) => Body::File(p),
        };
        let done = self.expect("PUT", &target, &headers, body, 201);
        assert_eq!(
            done.header("Docker-Content-Digest"),
            Some(blob.digest.as_str()),
            "registry stored {repo} blob under another digest"
        );
    }

    /// `PUT /v2/<repo>/manifests/<reference>`; returns the digest the registry computed.
    pub fn put_manifest(&self, repo: &str, reference: &str, manifest: &Blob) -> Digest {
        let bytes = manifest.bytes();
        let resp = self.expect(
            "PUT",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", &manifest.media_type)],
            Body::Bytes(&bytes),
            201,
        );
        let digest = resp
            .header("Docker-Content-Digest")
            .and_then(Digest::parse)
            .unwrap_or_else(|| panic!("manifest PUT to {repo} without Docker-Content-Digest"));
        assert_eq!(
            digest, manifest.digest,
            "the registry must store the manifest bytes unchanged"
        );
        digest
    }

    /// Pushes the blobs of `image`, then its manifest as `repo:tag`. Returns the manifest digest.
    pub fn push_image(&self, repo: &str, tag: &str, image: &Image) -> Digest {
        for blob in image.blobs() {
            self.push_blob(repo, blob);
        }
        self.put_manifest(repo, tag, &image.manifest)
    }

    /// Pushes every image of `index` by digest, then the index as `repo:tag`.
    pub fn push_index(&self, repo: &str, tag: &str, index: &Index) -> Digest {
        for image in &index.images {
            for blob in image.blobs() {
                self.push_blob(repo, blob);
            }
            self.put_manifest(repo, image.digest().as_str(), &image.manifest);
        }
        self.put_manifest(repo, tag, &index.manifest)
    }

    /// `DELETE` a manifest by digest (the registry has `delete: enabled`).
    pub fn delete_manifest(&self, repo: &str, digest: &Digest) -> io::Result<Response> {
        self.request(
            "DELETE",
            &format!("/v2/{repo}/manifests/{digest}"),
            &[],
            Body::Empty,
        )
    }

    fn expect(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Body<'_>,
        status: u16,
    ) -> Response {
        let resp = self
            .request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {}{path}: {e}", self.base_url()));
        assert_eq!(
            resp.status,
            status,
            "{method} {}{path}: {}",
            self.base_url(),
            resp.text()
        );
        resp
    }
}

/// The string list `field` of a JSON answer (`{"tags": [...]}`); `null` is an empty list, as
/// distribution sends for a repository without tags.
fn list_field(r: &Response, field: &str) -> io::Result<Vec<String>> {
    if r.status != 200 {
        return Err(io::Error::other(format!(
            "status {} instead of a {field} list: {}",
            r.status,
            r.text()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(io::Error::other)?;
    Ok(v[field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// The path and query of a `Location`, which distribution makes absolute
/// (`https://host/v2/...`) unless `relativeurls` is set.
fn path_of(location: &str) -> &str {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => location,
    }
}

/// One TLS connection with its handshake done, for several requests in a row
/// ([`RegistryClient::keep_alive`]).
pub struct KeepAlive {
    io: BufReader<StreamOwned<ClientConnection, TcpStream>>,
    authority: String,
    authorization: Option<String>,
}

impl KeepAlive {
    /// Sends a request (no body) and reads the whole response; the connection stays open
    /// unless the server closes it.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Response> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: pullproxy-harness\r\n",
            self.authority
        );
        if let Some(authorization) = &self.authorization {
            head += &format!("Authorization: {authorization}\r\n");
        }
        for (k, v) in headers {
            head += &format!("{k}: {v}\r\n");
        }
        head += "\r\n";
        let stream = self.io.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.flush()?;
        let mut body = Vec::new();
        let mut resp = read_response(&mut self.io, method == "HEAD", &mut body)?;
        resp.body = body;
        Ok(resp)
    }

    /// The TLS session (its negotiated parameters; key updates and close_notify go out with
    /// the next write or [`KeepAlive::flush_tls`]).
    pub fn tls(&mut self) -> &mut ClientConnection {
        &mut self.io.get_mut().conn
    }

    /// Writes whatever TLS records are queued (a key update, a close_notify).
    pub fn flush_tls(&mut self) -> io::Result<()> {
        let s = self.io.get_mut();
        while s.conn.wants_write() {
            s.conn.write_tls(&mut s.sock)?;
        }
        Ok(())
    }

    /// Reads until the server ends the connection: `Ok(bytes)` when it ended with a TLS
    /// close_notify (after `bytes` more plaintext), an error when it did not.
    pub fn read_to_close(&mut self) -> io::Result<usize> {
        let mut rest = Vec::new();
        self.io.read_to_end(&mut rest)
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Reads a response head and body (by `Content-Length`, chunked, or to the end).
fn read_response(
    r: &mut impl BufRead,
    head_only: bool,
    sink: &mut dyn Write,
) -> io::Result<Response> {
    let resp = read_head(r)?;
    if !has_body(&resp, head_only) {
        return Ok(resp);
    }
    if is_chunked(&resp) {
        read_chunked(r, sink)?;
    } else if let Some(len) = content_length(&resp)? {
        let copied = io::copy(&mut r.take(len), sink)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body ended after {copied} of {len} bytes"),
            ));
        }
    } else {
        match io::copy(r, sink) {
            // A peer that closes without TLS close_notify: the body still ended at EOF.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            other => {
                other?;
            }
        }
    }
    Ok(resp)
}

/// Whether a response to a request (`HEAD` or not) carries a body.
pub(crate) fn has_body(resp: &Response, head_only: bool) -> bool {
    !(head_only || resp.status == 204 || resp.status == 304 || (100..200).contains(&resp.status))
}

/// Whether the body is sent with `Transfer-Encoding: chunked`.
pub(crate) fn is_chunked(resp: &Response) -> bool {
    resp.header("Transfer-Encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
}

/// The `Content-Length`, if sent; an error if it is not a number.
pub(crate) fn content_length(resp: &Response) -> io::Result<Option<u64>> {
    resp.header("Content-Length")
        .map(|len| {
            len.parse()
                .map_err(|_| bad(format!("Content-Length {len:?}")))
        })
        .transpose()
}

/// Reads a status line and headers (the body, if any, is left in `r`).
pub(crate) fn read_head(r: &mut impl BufRead) -> io::Result<Response> {
    let status_line = read_line(r)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("header line {line:?}")))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Response {
        status,
        headers,
        body: Vec::new(),
    })
}

/// Reads a chunked body into `sink`, trailers included.
pub(crate) fn read_chunked(r: &mut impl BufRead, sink: &mut dyn Write) -> io::Result<()> {
    loop {
        let line = read_line(r)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            u64::from_str_radix(size, 16).map_err(|_| bad(format!("chunk size {line:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            while !read_line(r)?.is_empty() {}
            return Ok(());
        }
        let copied = io::copy(&mut r.take(size), sink)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunk cut short",
            ));
        }
        read_line(r)?;
    }
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the response ended",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Standard base64 with padding (RFC 4648), for the basic auth header.
pub(crate) fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("admin:pw", "YWRtaW46cHc="),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
    }

    #[test]
    fn location_becomes_a_request_target() {
        assert_eq!(
            path_of("https://registry-1.docker.io/v2/library/busybox/blobs/uploads/u?_state=x"),
            "/v2/library/busybox/blobs/uploads/u?_state=x"
        );
        assert_eq!(path_of("/v2/a/blobs/uploads/u"), "/v2/a/blobs/uploads/u");
    }

    #[test]
    fn responses_by_length_and_chunked() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloEXTRA";
        let mut body = Vec::new();
        let r = read_response(&mut &raw[..], false, &mut body).unwrap();
        assert_eq!((r.status, &body[..]), (200, &b"hello"[..]));
        assert_eq!(r.header("x-a"), Some("b"));

        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let mut body = Vec::new();
        let r = read_response(&mut &raw[..], false, &mut body).unwrap();
        assert_eq!((r.status, &body[..]), (404, &b"abcde"[..]));

        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n";
        let r = read_response(&mut &raw[..], true, &mut Vec::new()).unwrap();
        assert_eq!(r.header("content-length"), Some("100"));

        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(read_response(&mut &raw[..], false, &mut Vec::new()).is_err());
    }
}
