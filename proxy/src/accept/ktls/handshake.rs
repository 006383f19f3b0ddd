//! The server side of a TLS handshake driven through rustls' unbuffered API, reading the socket
//! one whole record at a time: when the handshake is done, every byte the client sent after its
//! Finished (its first request, typically) is still in the socket, where the kernel will decrypt
//! it. The buffered API reads ahead and would have swallowed it. The handshake ends as a
//! [`KernelConnection`], which derives new keys when the client updates its keys later.

use std::{io, sync::Arc, time::Duration};

use rustls::{
    ServerConfig,
    kernel::KernelConnection,
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// TLS record header: type, version, length.
const HEADER_LEN: usize = 5;
/// The longest record a peer may send: 2^14 bytes of plaintext plus 256 of AEAD expansion
/// (RFC 8446 5.2).
const MAX_RECORD: usize = (1 << 14) + 256;
/// How long a failing handshake may take to tell the client why (its alert).
const ALERT_GRACE: Duration = Duration::from_secs(1);

/// The keys and sequence numbers of both directions, and the connection state that derives the
/// next keys.
pub(crate) struct Completed {
    pub(crate) secrets: rustls::ExtractedSecrets,
    pub(crate) conn: KernelConnection<ServerConnectionData>,
}

/// An error as tokio-rustls reports one: a rustls error (an alert the client sent, a certificate
/// it refused) stays findable in the source chain.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What to do after one step of the state machine.
enum Next {
    Again,
    Read,
    Done,
    Failed(io::Error),
}

/// Runs the handshake on `stream` with `config` (which must allow secret extraction).
pub(crate) async fn accept(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
) -> io::Result<Completed> {
    let mut conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut incoming: Vec<u8> = Vec::with_capacity(HEADER_LEN + MAX_RECORD);
    let mut outgoing: Vec<u8> = vec![0; 4096];
    let mut pending = 0usize;
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming);
        let next = match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => loop {
                match data.encode(&mut outgoing[pending..]) {
                    Ok(n) => {
                        pending += n;
                        break Next::Again;
                    }
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        outgoing.resize(pending + required_size, 0)
                    }
                    Err(e) => break Next::Failed(io::Error::other(e.to_string())),
                }
            },
            Ok(ConnectionState::TransmitTlsData(data)) => {
                if let Err(e) = stream.write_all(&outgoing[..pending]).await {
                    break Err(e);
                }
                pending = 0;
                data.done();
                Next::Again
            }
            Ok(ConnectionState::BlockedHandshake) => Next::Read,
            Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                Next::Failed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the handshake",
                ))
            }
            Ok(other) => Next::Failed(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected {other:?} during the handshake"),
            )),
            Err(e) => {
                incoming.drain(..discard);
                send_alert(&mut conn, stream, &mut incoming).await;
                break Err(tls_error(e));
            }
        };
        incoming.drain(..discard);
        match next {
            Next::Again => {}
            Next::Read => read_record(stream, &mut incoming).await?,
            Next::Done if incoming.is_empty() => {
                let (secrets, conn) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
                return Ok(Completed { secrets, conn });
            }
            Next::Done => {
                break Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "records left over after the handshake",
                ));
            }
            Next::Failed(e) => break Err(e),
        }
    }
}

/// Appends exactly one record from `stream` to `buf`.
async fn read_record(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let start = buf.len();
    buf.resize(start + HEADER_LEN, 0);
    stream.read_exact(&mut buf[start..]).await?;
    let len = usize::from(u16::from_be_bytes([buf[start + 3], buf[start + 4]]));
    if len > MAX_RECORD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {len}-byte record"),
        ));
    }
    buf.resize(start + HEADER_LEN + len, 0);
    stream.read_exact(&mut buf[start + HEADER_LEN..]).await?;
    Ok(())
}

/// After a handshake error rustls has queued an alert: sends it, briefly and best-effort.
async fn send_alert(
    conn: &mut UnbufferedServerConnection,
    stream: &mut TcpStream,
    incoming: &mut [u8],
) {
    let mut out = [0u8; 64];
    let mut used = 0;
    for _ in 0..4 {
        let UnbufferedStatus { state, .. } = conn.process_tls_records(incoming);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => match data.encode(&mut out[used..]) {
                Ok(n) => used += n,
                Err(_) => return,
            },
            Ok(ConnectionState::TransmitTlsData(data)) => {
                let write = stream.write_all(&out[..used]);
                let _ = tokio::time::timeout(ALERT_GRACE, write).await;
                data.done();
                return;
            }
            _ => return,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The handshake against real rustls clients over loopback, and the keys it hands over
    //! checked the way the kernel would use them: records the client sends after the handshake
    //! decrypt with the receive state, records sealed with the transmit state decrypt in the
    //! client.

    use std::sync::Arc;

    use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};
    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        accept::ktls::{
            kernel_server_config,
            sys::{Cipher, CryptoInfo, RECORD_APPLICATION_DATA},
        },
        node_ca::{LeafMinter, NodeCa, TlsSettings},
    };

    /// A node CA, a minter and the kernel-TLS server configuration for `ciphers`.
    pub(crate) fn setup(
        dir: &std::path::Path,
        ciphers: &[Cipher],
    ) -> (Arc<NodeCa>, Arc<ServerConfig>) {
        let settings = TlsSettings::new(dir);
        let hosts = settings.intercept_set().unwrap();
        let (ca, _) = NodeCa::load_or_generate(&settings, &hosts).unwrap();
        let ca = Arc::new(ca);
        let minter = Arc::new(LeafMinter::new(ca.clone(), Arc::new(hosts)));
        (ca, kernel_server_config(minter, ciphers, None))
    }

    /// A client trusting `ca`, offering `suites` (all by default) and `alpn`.
    pub(crate) fn client(ca: &NodeCa, suites: Option<&[Cipher]>, alpn: &[&[u8]]) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let mut provider = (*crate::node_ca::crypto_provider()).clone();
        if let Some(suites) = suites {
            provider
                .cipher_suites
                .retain(|s| suites.iter().any(|c| c.tls13_suite() == s.suite()));
        }
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// The kernel's view of one direction: RFC 8446 5.2 records under `info`.
    pub(crate) struct RecordLayer {
        key: LessSafeKey,
        nonce: [u8; 12],
        seq: u64,
    }

    impl RecordLayer {
        pub(crate) fn new(info: &CryptoInfo) -> Self {
            let (key, nonce, seq) = info.parts();
            let alg = match info.cipher() {
                Cipher::Aes128Gcm => &aead::AES_128_GCM,
                Cipher::Aes256Gcm => &aead::AES_256_GCM,
                Cipher::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
            };
            Self {
                key: LessSafeKey::new(UnboundKey::new(alg, &key).unwrap()),
                nonce,
                seq,
            }
        }

        fn nonce(&mut self) -> Nonce {
            let mut n = self.nonce;
            for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
                *b ^= s;
            }
            self.seq += 1;
            Nonce::assume_unique_for_key(n)
        }

        /// Decrypts one whole record; returns (inner content type, plaintext).
        pub(crate) fn open(&mut self, record: &[u8]) -> (u8, Vec<u8>) {
            let (header, body) = record.split_at(HEADER_LEN);
            let mut body = body.to_vec();
            let nonce = self.nonce();
            let plain = self
                .key
                .open_in_place(nonce, Aad::from(header), &mut body)
                .expect("the record decrypts with the kernel's keys");
            let end = plain.iter().rposition(|b| *b != 0).unwrap();
            (plain[end], plain[..end].to_vec())
        }

        /// Encrypts `data` as one record of `content_type`.
        pub(crate) fn seal(&mut self, content_type: u8, data: &[u8]) -> Vec<u8> {
            let mut inner = data.to_vec();
            inner.push(content_type);
            let len = (inner.len() + self.key.algorithm().tag_len()) as u16;
            let mut header = vec![RECORD_APPLICATION_DATA, 3, 3];
            header.extend(len.to_be_bytes());
            let nonce = self.nonce();
            self.key
                .seal_in_place_append_tag(nonce, Aad::from(&header[..]), &mut inner)
                .unwrap();
            header.extend(inner);
            header
        }
    }

    /// A loopback connection with the handshake done on the server side by [`accept`] and on
    /// the client side by rustls, which then immediately wrote `early` (before reading
    /// anything: the server's tickets are still unread).
    pub(crate) async fn handshaken(
        server: Arc<ServerConfig>,
        client: ClientConfig,
        early: &[u8],
    ) -> io::Result<(TcpStream, Completed, ClientConnection, std::net::TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let early = early.to_vec();
        let client_side = tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            let name = ServerName::try_from("registry-1.docker.io").unwrap();
            let mut conn = ClientConnection::new(Arc::new(client), name).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp)?;
            }
            conn.writer().write_all(&early)?;
            while conn.wants_write() {
                conn.write_tls(&mut tcp)?;
            }
            Ok::<_, io::Error>((conn, tcp))
        });
        let (mut stream, _) = listener.accept().await.unwrap();
        let completed = accept(&mut stream, server).await;
        let (conn, tcp) = client_side.await.unwrap()?;
        Ok((stream, completed?, conn, tcp))
    }

    /// Reads one whole record from the server's socket.
    pub(crate) async fn next_record(stream: &mut TcpStream) -> Vec<u8> {
        let mut record = Vec::new();
        read_record(stream, &mut record).await.unwrap();
        record
    }

    #[tokio::test]
    async fn the_first_request_stays_in_the_socket_and_opens_with_the_handed_over_keys() {
        let dir = tempfile::tempdir().unwrap();
        for cipher in Cipher::ALL {
            let (ca, server) = setup(dir.path(), &Cipher::ALL);
            let request = b"GET /v2/ HTTP/1.1\r\nHost: registry-1.docker.io\r\n\r\n";
            let (mut stream, done, mut client, mut tcp) = handshaken(
                server,
                client(&ca, Some(&[cipher]), &[b"http/1.1"]),
                request,
            )
            .await
            .unwrap();
            assert_eq!(
                done.conn.negotiated_cipher_suite().suite(),
                cipher.tls13_suite()
            );
            assert_eq!(
                done.conn.protocol_version(),
                rustls::ProtocolVersion::TLSv1_3
            );

            // The client's request, written right after its Finished, was not read by the
            // handshake: it decrypts with the receive keys, from the handed-over sequence number.
            let rx = CryptoInfo::tls13(&done.secrets.rx.1, done.secrets.rx.0).unwrap();
            assert_eq!(rx.cipher(), cipher);
            let (kind, plain) = RecordLayer::new(&rx).open(&next_record(&mut stream).await);
            assert_eq!(
                (kind, plain.as_slice()),
                (RECORD_APPLICATION_DATA, &request[..])
            );

            // What the kernel would send decrypts in the client, after the session tickets the
            // handshake sent (so the transmit sequence number counted them).
            let tx = CryptoInfo::tls13(&done.secrets.tx.1, done.secrets.tx.0).unwrap();
            assert!(
                done.secrets.tx.0 >= 1,
                "tickets went out before the keys were handed over"
            );
            let record =
                RecordLayer::new(&tx).seal(RECORD_APPLICATION_DATA, b"HTTP/1.1 200 OK\r\n");
            stream.write_all(&record).await.unwrap();
            let got = tokio::task::spawn_blocking(move || {
                use std::io::Read as _;
                let mut got = [0u8; 17];
                rustls::Stream::new(&mut client, &mut tcp)
                    .read_exact(&mut got)
                    .map(|()| got)
            })
            .await
            .unwrap()
            .unwrap();
            assert_eq!(&got, b"HTTP/1.1 200 OK\r\n", "{cipher:?}");
        }
    }

    #[tokio::test]
    async fn a_client_the_configuration_cannot_serve_gets_an_alert() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, server) = setup(dir.path(), &[Cipher::Aes128Gcm]);
        // Offers only AES-256: no common suite. The client learns why from the alert.
        let err = handshaken(server, client(&ca, Some(&[Cipher::Aes256Gcm]), &[]), b"")
            .await
            .err()
            .expect("no common cipher suite");
        let text = format!("{err:?}");
        assert!(text.contains("HandshakeFailure"), "{text}");
    }
}
