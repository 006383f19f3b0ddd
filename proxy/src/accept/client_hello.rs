//! Reads the server name (SNI) from the first bytes of a connection without consuming them, so a
//! connection can still be spliced untouched or handed to the TLS acceptor; and what the client
//! offers (TLS versions, cipher suites, ALPN), which decides whether its TLS can go to the kernel.

use std::{io, time::Duration};

use rustls_pki_types::DnsName;
use tokio::net::TcpStream;

/// The most bytes looked at. A ClientHello is a few hundred bytes, about 1.8 KiB with a
/// post-quantum key share; a hello that does not fit here is treated as malformed.
pub const PEEK_LIMIT: usize = 16 * 1024;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHelloPeek {
    /// Not a TLS handshake (plain HTTP, another protocol): route or splice it as such.
    NotTls,
    /// A TLS handshake so far, but the ClientHello is cut off: peek again with more bytes.
    Incomplete,
    /// A complete ClientHello without a server name (a client connecting by IP address).
    NoSni,
    /// The server name, lowercased and without a trailing dot (a valid DNS name), and the
    /// client's offer.
    Sni(String, TlsOffer),
    /// Claims to be TLS but breaks the record or ClientHello grammar (or exceeds
    /// [`PEEK_LIMIT`]); the reason is for logs.
    Malformed(&'static str),
}

/// What a ClientHello offers, as far as choosing the server's TLS path goes. Extensions that do
/// not parse count as absent: the handshake itself will refuse them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOffer {
    /// `supported_versions` lists TLS 1.3.
    pub(crate) tls13: bool,
    /// Cipher suites, in the client's order.
    pub(crate) suites: Vec<u16>,
    /// ALPN protocol names, in the client's order; empty without the extension.
    pub(crate) alpn: Vec<Vec<u8>>,
}

/// TLS record content type `handshake`.
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
const EXTENSION_ALPN: u16 = 16;
const EXTENSION_SUPPORTED_VERSIONS: u16 = 43;
const TLS13: u16 = 0x0304;
const NAME_TYPE_HOST_NAME: u8 = 0;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 5.1: a plaintext record's length MUST NOT exceed 2^14.
const MAX_RECORD_LEN: usize = 1 << 14;

/// Parses the start of a connection. Never panics, whatever the bytes; looks at no more than
/// [`PEEK_LIMIT`] of them.
pub fn parse_client_hello(buf: &[u8]) -> ClientHelloPeek {
    let buf = &buf[..buf.len().min(PEEK_LIMIT)];
    match handshake_message(buf) {
        Ok(message) => parse_hello_body(&message),
        Err(outcome) => outcome,
    }
}

/// Collects the first handshake message from one or more handshake records (clients may
/// fragment a large hello), returning the message body without its 4-byte header.
fn handshake_message(buf: &[u8]) -> Result<Vec<u8>, ClientHelloPeek> {
    use ClientHelloPeek::{Incomplete, Malformed, NotTls};

    // The first two bytes decide whether this is TLS at all; anything later that is wrong is
    // malformed TLS rather than another protocol.
    match buf {
        [] => return Err(Incomplete),
        [first, ..] if *first != CONTENT_HANDSHAKE => return Err(NotTls),
        [_, major, ..] if *major != 3 => return Err(NotTls),
        _ => {}
    }
    let cut_off = || {
        if buf.len() >= PEEK_LIMIT {
            Malformed("client hello larger than the peek limit")
        } else {
            Incomplete
        }
    };

    let mut message = Vec::new();
    let mut rest = buf;
    loop {
        let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
            return Err(cut_off());
        };
        if header[0] != CONTENT_HANDSHAKE || header[1] != 3 {
            return Err(Malformed("a non-handshake record inside the client hello"));
        }
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_len == 0 {
            return Err(Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(Malformed("record longer than 2^14 bytes"));
        }
        let body = &rest[RECORD_HEADER_LEN..];
        let available = body.len().min(record_len);
        message.extend_from_slice(&body[..available]);

        if message.len() >= HANDSHAKE_HEADER_LEN {
            if message[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(Malformed("first handshake message is not a client hello"));
            }
            let hello_len = usize::from(message[1]) << 16
                | usize::from(message[2]) << 8
                | usize::from(message[3]);
            if HANDSHAKE_HEADER_LEN + hello_len > PEEK_LIMIT - RECORD_HEADER_LEN {
                return Err(Malformed("client hello larger than the peek limit"));
            }
            if message.len() >= HANDSHAKE_HEADER_LEN + hello_len {
                // Anything after the hello in the same record is not ours to judge.
                message.truncate(HANDSHAKE_HEADER_LEN + hello_len);
                message.drain(..HANDSHAKE_HEADER_LEN);
                return Ok(message);
            }
        }
        if available < record_len {
            return Err(cut_off());
        }
        rest = &body[record_len..];
    }
}

/// A bounds-checked cursor over a complete message: running short means the message lied about
/// a length, which is malformed (truncation was ruled out before).
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let len = self.u8()?;
        self.take(usize::from(len))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Parses a ClientHello body (RFC 8446 4.1.2, RFC 5246 7.4.1.2) down to the server_name
/// extension (RFC 6066 3).
fn parse_hello_body(body: &[u8]) -> ClientHelloPeek {
    use ClientHelloPeek::{Malformed, NoSni};

    let mut r = Reader { bytes: body };
    let Some(_legacy_version) = r.u16() else {
        return Malformed("client hello too short for its version");
    };
    if r.take(32).is_none() {
        return Malformed("client hello too short for its random");
    }
    match r.vec8() {
        Some(session_id) if session_id.len() <= 32 => {}
        Some(_) => return Malformed("session id longer than 32 bytes"),
        None => return Malformed("session id overruns the hello"),
    }
    let mut offer = TlsOffer::default();
    match r.vec16() {
        Some(suites) if !suites.is_empty() && suites.len() % 2 == 0 => {
            offer.suites = suites
                .as_chunks::<2>()
                .0
                .iter()
                .map(|s| u16::from_be_bytes(*s))
                .collect();
        }
        Some(_) => return Malformed("cipher suite list is empty or odd"),
        None => return Malformed("cipher suites overrun the hello"),
    }
    match r.vec8() {
        Some(methods) if !methods.is_empty() => {}
        Some(_) => return Malformed("no compression method"),
        None => return Malformed("compression methods overrun the hello"),
    }
    if r.is_empty() {
        // Extensions are optional before TLS 1.3; without them there is no server name.
        return NoSni;
    }
    let Some(extensions) = r.vec16() else {
        return Malformed("extensions overrun the hello");
    };
    if !r.is_empty() {
        return Malformed("bytes after the extensions");
    }

    let mut extensions = Reader { bytes: extensions };
    let mut server_name = None;
    while !extensions.is_empty() {
        let (Some(kind), Some(data)) = (extensions.u16(), extensions.vec16()) else {
            return Malformed("an extension overruns the extension list");
        };
        match kind {
            EXTENSION_SERVER_NAME => {}
            EXTENSION_SUPPORTED_VERSIONS => {
                offer.tls13 = Reader { bytes: data }
                    .vec8()
                    .is_some_and(|v| v.as_chunks::<2>().0.contains(&TLS13.to_be_bytes()));
                continue;
            }
            EXTENSION_ALPN => {
                offer.alpn = parse_alpn(data);
                continue;
            }
            _ => continue,
        }
        if server_name.is_some() {
            return Malformed("two server_name extensions");
        }
        server_name = Some(data);
    }
    match server_name {
        None => NoSni,
        Some(data) => match parse_server_name(data) {
            Ok(Some(name)) => ClientHelloPeek::Sni(name, offer),
            Ok(None) => NoSni,
            Err(reason) => Malformed(reason),
        },
    }
}

/// The ALPN extension's protocol names (RFC 7301 3.1); none if it does not parse.
fn parse_alpn(data: &[u8]) -> Vec<Vec<u8>> {
    let mut r = Reader { bytes: data };
    let Some(list) = r.vec16() else {
        return Vec::new();
    };
    let mut list = Reader { bytes: list };
    let mut names = Vec::new();
    while !list.is_empty() {
        match list.vec8() {
            Some(name) => names.push(name.to_vec()),
            None => return Vec::new(),
        }
    }
    names
}

/// The server_name extension's data: a list of (name type, name) with at most one host name.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, &'static str> {
    let mut r = Reader { bytes: data };
    let Some(list) = r.vec16() else {
        return Err("server name list overruns its extension");
    };
    if !r.is_empty() || list.is_empty() {
        return Err("server name extension is not one non-empty list");
    }
    let mut list = Reader { bytes: list };
    let mut host_name = None;
    while !list.is_empty() {
        let (Some(name_type), Some(name)) = (list.u8(), list.vec16()) else {
            return Err("a server name overruns its list");
        };
        if name_type != NAME_TYPE_HOST_NAME {
            // No other type is defined; every client sends opaque<1..2^16-1>, so it can be skipped.
            continue;
        }
        if host_name.is_some() {
            return Err("two host names in server_name");
        }
        host_name = Some(name);
    }
    let Some(name) = host_name else {
        return Ok(None);
    };
    // DnsName validates the syntax, rejects IP literals (RFC 6066 forbids them here) and strips
    // one trailing dot, which is what rustls hands the certificate resolver too.
    match std::str::from_utf8(name)
        .ok()
        .and_then(|s| DnsName::try_from(s).ok())
    {
        Some(dns) => Ok(Some(dns.as_ref().to_ascii_lowercase())),
        None => Err("server name is not a valid DNS name"),
    }
}

/// Peeks at `stream` until the ClientHello can be judged, consuming nothing.
///
/// A hello almost always arrives in one segment; when it does not, this peeks again after a short
/// sleep (a peek that succeeds does not clear readiness, so waiting for readiness would spin).
/// Returns `TimedOut` when the client sends too little within `deadline`, e.g. a protocol in which
/// the server speaks first; the caller decides (usually: splice). `Incomplete` means the client
/// closed before sending anything.
pub(crate) async fn peek_client_hello(
    stream: &TcpStream,
    deadline: Duration,
) -> io::Result<ClientHelloPeek> {
    let mut buf = vec![0u8; PEEK_LIMIT];
    let peek = async {
        let mut backoff = Duration::from_millis(1);
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                // Closed before a complete hello: nothing to route.
                return Ok(ClientHelloPeek::Incomplete);
            }
            match parse_client_hello(&buf[..n]) {
                ClientHelloPeek::Incomplete => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(25));
                }
                outcome => return Ok(outcome),
            }
        }
    };
    tokio::time::timeout(deadline, peek)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete client hello before the deadline",
            ))
        })
}

#[cfg(test)]
mod tests {
    use rustls::{ClientConnection, pki_types::ServerName};

    use super::*;

    /// The bytes a real rustls client sends first when connecting to `server_name`.
    pub(crate) fn rustls_client_hello(server_name: &str) -> Vec<u8> {
        let config = crate::origins::client::trusting_nothing();
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(config, name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    fn name_of(peek: ClientHelloPeek) -> Option<String> {
        match peek {
            ClientHelloPeek::Sni(name, _) => Some(name),
            _ => None,
        }
    }

    /// Builds a hello record by hand around the given extensions block.
    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        wrap_hello(&body)
    }

    fn wrap_hello(body: &[u8]) -> Vec<u8> {
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend(body);
        let mut record = vec![CONTENT_HANDSHAKE, 3, 1];
        record.extend((message.len() as u16).to_be_bytes());
        record.extend(message);
        record
    }

    fn sni_extension(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in names {
            list.push(*kind);
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(*name);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend(list);
        let mut ext = EXTENSION_SERVER_NAME.to_be_bytes().to_vec();
        ext.extend((data.len() as u16).to_be_bytes());
        ext.extend(data);
        ext
    }

    #[test]
    fn real_client_hello_yields_the_server_name() {
        let hello = rustls_client_hello("Registry-1.Docker.IO");
        assert_eq!(
            name_of(parse_client_hello(&hello)).as_deref(),
            Some("registry-1.docker.io")
        );
        // Trailing bytes (the client's next flight) do not matter.
        let mut more = hello.clone();
        more.extend([23, 3, 3, 0, 1, 0]);
        assert_eq!(
            name_of(parse_client_hello(&more)).as_deref(),
            Some("registry-1.docker.io")
        );
    }

    #[test]
    fn the_offer_lists_versions_suites_and_protocols() {
        let hello = rustls_client_hello("quay.io");
        let ClientHelloPeek::Sni(_, offer) = parse_client_hello(&hello) else {
            panic!("no server name");
        };
        assert!(offer.tls13);
        // rustls' aws-lc-rs provider, in its order: the TLS 1.3 suites first.
        assert_eq!(&offer.suites[..3], &[0x1302, 0x1301, 0x1303]);
        assert!(offer.alpn.is_empty(), "the test client offers no ALPN");

        let mut ext = sni_extension(&[(0, b"quay.io")]);
        // supported_versions: TLS 1.2 only; ALPN: h2, http/1.1.
        ext.extend([0, 43, 0, 3, 2, 3, 3]);
        ext.extend([0, 16, 0, 14, 0, 12, 2, b'h', b'2', 8]);
        ext.extend(b"http/1.1");
        let ClientHelloPeek::Sni(_, offer) = parse_client_hello(&hello_with_extensions(&ext))
        else {
            panic!("no server name");
        };
        assert!(!offer.tls13);
        assert_eq!(offer.suites, [0x1301]);
        assert_eq!(offer.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);

        // An ALPN list that overruns itself counts as none (the handshake refuses it).
        let mut bad = sni_extension(&[(0, b"quay.io")]);
        bad.extend([0, 16, 0, 4, 0, 2, 9, b'x']);
        let ClientHelloPeek::Sni(_, offer) = parse_client_hello(&hello_with_extensions(&bad))
        else {
            panic!("no server name");
        };
        assert!(offer.alpn.is_empty());
    }

    #[test]
    fn every_truncation_of_a_real_hello_is_incomplete() {
        let hello = rustls_client_hello("quay.io");
        for end in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..end]),
                ClientHelloPeek::Incomplete,
                "cut at {end} of {}",
                hello.len()
            );
        }
    }

    #[test]
    fn a_hello_fragmented_over_records_is_reassembled() {
        let hello = rustls_client_hello("ghcr.io");
        let message = &hello[RECORD_HEADER_LEN..];
        let mut fragmented = Vec::new();
        for chunk in message.chunks(50) {
            fragmented.extend([CONTENT_HANDSHAKE, 3, 3]);
            fragmented.extend((chunk.len() as u16).to_be_bytes());
            fragmented.extend(chunk);
        }
        assert_eq!(
            name_of(parse_client_hello(&fragmented)).as_deref(),
            Some("ghcr.io")
        );
        for end in 0..fragmented.len() {
            assert_eq!(
                parse_client_hello(&fragmented[..end]),
                ClientHelloPeek::Incomplete,
                "cut at {end}"
            );
        }
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for start in [
            &b"GET /v2/ HTTP/1.1\r\nHost: registry-1.docker.io\r\n\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            &[0x80, 0x2e, 0x01, 0x03, 0x01], // SSLv2-compatible hello
            &[CONTENT_HANDSHAKE, 0x47],
        ] {
            assert_eq!(parse_client_hello(start), ClientHelloPeek::NotTls);
        }
        assert_eq!(parse_client_hello(&[]), ClientHelloPeek::Incomplete);
        assert_eq!(
            parse_client_hello(&[CONTENT_HANDSHAKE]),
            ClientHelloPeek::Incomplete
        );
    }

    #[test]
    fn hellos_without_a_host_name_have_no_sni() {
        assert_eq!(
            parse_client_hello(&hello_with_extensions(&[])),
            ClientHelloPeek::NoSni
        );
        // No extensions block at all (pre-TLS 1.3 clients may omit it).
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        assert_eq!(
            parse_client_hello(&wrap_hello(&body)),
            ClientHelloPeek::NoSni
        );
        // Only a name of an unknown type.
        let ext = sni_extension(&[(7, b"opaque")]);
        assert_eq!(
            parse_client_hello(&hello_with_extensions(&ext)),
            ClientHelloPeek::NoSni
        );
    }

    #[test]
    fn bad_server_names_are_malformed() {
        for name in [
            &b"10.0.0.1"[..],
            b"",
            b"bad name.example",
            b"-lead.example",
            b"\xff\xfe.example",
            b"a..b",
        ] {
            let ext = sni_extension(&[(NAME_TYPE_HOST_NAME, name)]);
            assert!(
                matches!(
                    parse_client_hello(&hello_with_extensions(&ext)),
                    ClientHelloPeek::Malformed(_)
                ),
                "{name:?}"
            );
        }
        let two = sni_extension(&[(0, b"a.example"), (0, b"b.example")]);
        assert!(matches!(
            parse_client_hello(&hello_with_extensions(&two)),
            ClientHelloPeek::Malformed(_)
        ));
        let one = sni_extension(&[(0, b"a.example")]);
        let twice = [one.clone(), one].concat();
        assert!(matches!(
            parse_client_hello(&hello_with_extensions(&twice)),
            ClientHelloPeek::Malformed(_)
        ));
        let dotted = sni_extension(&[(0, b"Quay.IO.")]);
        assert_eq!(
            name_of(parse_client_hello(&hello_with_extensions(&dotted))).as_deref(),
            Some("quay.io")
        );
    }

    #[test]
    fn hostile_lengths_are_malformed_not_panics() {
        // A record claiming more than 2^14 bytes.
        assert!(matches!(
            parse_client_hello(&[CONTENT_HANDSHAKE, 3, 1, 0xff, 0xff, 1]),
            ClientHelloPeek::Malformed(_)
        ));
        // A handshake message claiming 16 MiB.
        assert!(matches!(
            parse_client_hello(&[CONTENT_HANDSHAKE, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]),
            ClientHelloPeek::Malformed(_)
        ));
        // A hello that keeps coming in tiny records until the peek limit.
        let mut endless = vec![CONTENT_HANDSHAKE, 3, 1, 0, 4, 1, 0, 0x3f, 0];
        while endless.len() < PEEK_LIMIT + 100 {
            endless.extend([CONTENT_HANDSHAKE, 3, 1, 0, 1, 0]);
        }
        assert!(matches!(
            parse_client_hello(&endless),
            ClientHelloPeek::Malformed(_)
        ));
        // Every length field of a real hello set to its maximum, and to zero.
        let hello = rustls_client_hello("registry.k8s.io");
        for at in 0..hello.len() - 1 {
            for value in [0x00, 0xff] {
                let mut bent = hello.clone();
                bent[at] = value;
                bent[at + 1] = value;
                let _ = parse_client_hello(&bent);
            }
        }
    }

    /// A small xorshift generator: deterministic, so a failure reproduces.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_bytes_and_mutations_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let hello = rustls_client_hello("mcr.microsoft.com");
        for round in 0..20_000 {
            let input: Vec<u8> = if round % 2 == 0 {
                // Random bytes, sometimes behind a plausible record header so the deeper
                // parsers get exercised too.
                let len = (rng.next() % 600) as usize;
                let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if round % 4 == 0 && bytes.len() >= 6 {
                    bytes[..6].copy_from_slice(&[CONTENT_HANDSHAKE, 3, 1, 2, 0x50, 1]);
                }
                bytes
            } else {
                let mut bent = hello.clone();
                for _ in 0..1 + rng.next() % 4 {
                    let at = (rng.next() as usize) % bent.len();
                    bent[at] = rng.next() as u8;
                }
                let end = (rng.next() as usize) % (bent.len() + 1);
                bent.truncate(end.max(bent.len() / 2));
                bent
            };
            let outcome = parse_client_hello(&input);
            if let ClientHelloPeek::Sni(name, _) = outcome {
                assert!(DnsName::try_from(name.as_str()).is_ok(), "{name:?}");
                assert_eq!(name, name.to_ascii_lowercase());
            }
        }
    }

    #[tokio::test]
    async fn peek_waits_for_the_rest_and_consumes_nothing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = rustls_client_hello("nvcr.io");
        let client_hello = hello.clone();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let (a, b) = client_hello.split_at(40);
            s.write_all(a).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            s.write_all(b).await.unwrap();
            s
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let outcome = peek_client_hello(&server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(name_of(outcome).as_deref(), Some("nvcr.io"));
        let mut read = vec![0; hello.len()];
        server.read_exact(&mut read).await.unwrap();
        assert_eq!(read, hello, "peeking must leave the bytes in place");
        drop(client.await.unwrap());

        // A client that says nothing: the deadline ends the wait.
        let silent = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let err = peek_client_hello(&server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(silent);
    }
}
