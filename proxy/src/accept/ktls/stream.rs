//! A connection whose records the kernel encrypts and decrypts. Reads go through `recvmsg`, so
//! records other than application data (alerts, post-handshake messages) arrive as what they
//! are instead of failing the read: a close_notify ends the stream, other alerts end it with an
//! error, and a TLS 1.3 KeyUpdate is answered with new keys for the kernel (Linux 6.14 and later
//! take them; on older kernels the connection ends, and the client reconnects). Writes are the
//! socket's, except that file bodies go out with `sendfile` ([`FileSender`]).

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use rustls::{kernel::KernelConnection, server::ServerConnectionData};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

use super::{
    KtlsMetrics,
    sys::{self, CryptoInfo, Direction, RECORD_ALERT, RECORD_APPLICATION_DATA, RECORD_HANDSHAKE},
};
use crate::accept::conn::{FileSender, Reset};

/// Alert descriptions (RFC 8446 6).
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_USER_CANCELED: u8 = 90;
const ALERT_LEVEL_WARNING: u8 = 1;
const ALERT_LEVEL_FATAL: u8 = 2;
/// Handshake message type `key_update` (RFC 8446 4.6.3).
const KEY_UPDATE: u8 = 24;
/// A control record longer than any message this side accepts after the handshake.
const CONTROL_MAX: usize = 1 << 14;

/// What a complete control record asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Control {
    /// close_notify: the client sends no more.
    Closed,
    /// An alert to ignore (user_canceled, which precedes a close_notify).
    Ignore,
    /// The client changed its sending keys; `requested`: it wants ours changed too.
    KeyUpdate { requested: bool },
    /// The client ended the connection with a fatal alert: it ends, without an answer (RFC 8446
    /// 6.2).
    Alert(u8),
    /// The client sent something it must not: the connection ends with an alert.
    Fail(String),
}

/// Whether `payload` holds a whole message of `record_type` (alerts and handshake messages say
/// their own length), for kernels that do not mark the end of a control record.
fn control_complete(record_type: u8, payload: &[u8]) -> bool {
    match (record_type, payload) {
        (RECORD_ALERT, p) => p.len() >= 2,
        (RECORD_HANDSHAKE, [_, a, b, c, rest @ ..]) => {
            rest.len() >= usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c)
        }
        _ => false,
    }
}

/// Reads a control record: its content type and whole payload.
pub(super) fn parse_control(record_type: u8, payload: &[u8]) -> Control {
    match (record_type, payload) {
        (RECORD_ALERT, [_, ALERT_CLOSE_NOTIFY]) => Control::Closed,
        (RECORD_ALERT, [_, ALERT_USER_CANCELED]) => Control::Ignore,
        (RECORD_ALERT, [_, description]) => Control::Alert(*description),
        (RECORD_ALERT, _) => Control::Fail("a malformed alert".into()),
        // One handshake message per record: a client has nothing else to send after the
        // handshake (no tickets: those go from server to client).
        (RECORD_HANDSHAKE, [KEY_UPDATE, 0, 0, 1, request @ (0 | 1)]) => Control::KeyUpdate {
            requested: *request == 1,
        },
        (RECORD_HANDSHAKE, [kind, ..]) => {
            Control::Fail(format!("handshake message {kind} after the handshake"))
        }
        (other, _) => Control::Fail(format!("a record of type {other} after the handshake")),
    }
}

/// A TLS connection after the handshake, with the kernel doing the record layer.
pub(crate) struct KtlsStream {
    io: TcpStream,
    conn: KernelConnection<ServerConnectionData>,
    files: FileSender,
    metrics: Arc<KtlsMetrics>,
    /// A control record read so far (the kernel may return it in parts), and its type.
    control: Vec<u8>,
    control_type: u8,
    /// The client's close_notify arrived: reads return end-of-stream.
    read_closed: bool,
    /// The client asked for new sending keys: they go out before the next write.
    key_update_pending: bool,
    /// Our close_notify went out.
    close_sent: bool,
}

impl KtlsStream {
    pub(super) fn new(
        io: TcpStream,
        conn: KernelConnection<ServerConnectionData>,
        metrics: Arc<KtlsMetrics>,
    ) -> Self {
        let files = FileSender::new(metrics.sendfile_bytes.clone());
        Self {
            io,
            conn,
            files,
            metrics,
            control: Vec::new(),
            control_type: 0,
            read_closed: false,
            key_update_pending: false,
            close_sent: false,
        }
    }

    /// Where this connection's file bodies queue their ranges.
    pub(crate) fn files(&self) -> FileSender {
        self.files.clone()
    }

    /// Acts on a complete control record; `Ok(true)`: the stream has ended.
    fn on_control(&mut self) -> io::Result<bool> {
        let control = parse_control(self.control_type, &self.control);
        self.control.clear();
        match control {
            Control::Closed => {
                self.read_closed = true;
                Ok(true)
            }
            Control::Ignore => Ok(false),
            Control::KeyUpdate { requested } => {
                self.update_receive_keys()?;
                self.key_update_pending |= requested;
                Ok(false)
            }
            Control::Alert(description) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("the client sent alert {description}"),
            )),
            Control::Fail(why) => {
                // Tell the client, if the socket takes it now; the connection ends either way.
                let _ = sys::send_record(
                    &self.io,
                    RECORD_ALERT,
                    &[ALERT_LEVEL_FATAL, ALERT_UNEXPECTED_MESSAGE],
                );
                Err(io::Error::new(io::ErrorKind::InvalidData, why))
            }
        }
    }

    /// The client's next records use its next keys: the kernel gets them before it decrypts
    /// another record (it holds reads until then).
    fn update_receive_keys(&mut self) -> io::Result<()> {
        let (seq, secrets) = self.conn.update_rx_secret().map_err(io::Error::other)?;
        let info = CryptoInfo::tls13(&secrets, seq)
            .ok_or_else(|| io::Error::other("no kernel layout for the new keys"))?;
        match sys::set_crypto(&self.io, Direction::Receive, &info) {
            Ok(()) => {
                self.metrics.key_update("rekeyed");
                Ok(())
            }
            Err(e) => {
                self.metrics.key_update("unsupported");
                debug!(error = %e, "the kernel cannot take new TLS keys (Linux 6.14 can); closing");
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the client updated its TLS keys and the kernel cannot follow: {e}"),
                ))
            }
        }
    }

    /// Answers a KeyUpdate that asked for ours: the KeyUpdate goes out under the current keys,
    /// then the kernel encrypts with the next ones.
    fn poll_key_update(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.key_update_pending {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_send_record(cx, RECORD_HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0]))?;
        self.key_update_pending = false;
        let (seq, secrets) = self.conn.update_tx_secret().map_err(io::Error::other)?;
        let info = CryptoInfo::tls13(&secrets, seq)
            .ok_or_else(|| io::Error::other("no kernel layout for the new keys"))?;
        sys::set_crypto(&self.io, Direction::Transmit, &info)?;
        Poll::Ready(Ok(()))
    }

    fn poll_send_record(
        &self,
        cx: &mut Context<'_>,
        record_type: u8,
        data: &[u8],
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.io.poll_write_ready(cx))?;
            match self.io.try_io(Interest::WRITABLE, || {
                sys::send_record(&self.io, record_type, data)
            }) {
                Ok(n) if n == data.len() => return Poll::Ready(Ok(())),
                Ok(_) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "a control record went out in part",
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for KtlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            ready!(this.io.poll_read_ready(cx))?;
            // SAFETY: `recv_record` only writes to the unfilled part; the bytes it reports are
            // initialised before `assume_init` says so.
            let unfilled = unsafe { buf.unfilled_mut() };
            let received = match this
                .io
                .try_io(Interest::READABLE, || sys::recv_record(&this.io, unfilled))
            {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            match received.record_type {
                // End of stream (a FIN without close_notify).
                None if received.len == 0 => return Poll::Ready(Ok(())),
                Some(RECORD_APPLICATION_DATA) | None => {
                    if received.len == 0 {
                        // An empty application data record: nothing to hand up.
                        continue;
                    }
                    // SAFETY: recvmsg initialised `len` bytes at the start of `unfilled`.
                    unsafe { buf.assume_init(received.len) };
                    buf.advance(received.len);
                    return Poll::Ready(Ok(()));
                }
                Some(kind) => {
                    // SAFETY: as above; these bytes are copied out and not reported as read.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(unfilled.as_ptr().cast::<u8>(), received.len)
                    };
                    if this.control.is_empty() {
                        this.control_type = kind;
                    }
                    this.control.extend_from_slice(bytes);
                    if this.control.len() > CONTROL_MAX {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "an oversized control record",
                        )));
                    }
                    let whole = received.end_of_record
                        || control_complete(this.control_type, &this.control);
                    if whole && this.on_control()? {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for KtlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_key_update(cx))?;
        this.files
            .poll_write_vectored(&this.io, cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_key_update(cx))?;
        this.files.poll_write_vectored(&this.io, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_key_update(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_key_update(cx))?;
        if !this.close_sent {
            ready!(this.poll_send_record(
                cx,
                RECORD_ALERT,
                &[ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY]
            ))?;
            this.close_sent = true;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl Reset for KtlsStream {
    fn reset_on_drop(&self) {
        self.io.reset_on_drop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_say_when_they_are_whole() {
        assert!(!control_complete(RECORD_ALERT, &[1]));
        assert!(control_complete(RECORD_ALERT, &[1, 0]));
        assert!(!control_complete(RECORD_HANDSHAKE, &[24, 0, 0]));
        assert!(!control_complete(RECORD_HANDSHAKE, &[24, 0, 0, 1]));
        assert!(control_complete(RECORD_HANDSHAKE, &[24, 0, 0, 1, 1]));
        assert!(!control_complete(20, &[1]));
    }

    #[test]
    fn control_records_are_read_for_what_they_are() {
        assert_eq!(parse_control(RECORD_ALERT, &[1, 0]), Control::Closed);
        assert_eq!(parse_control(RECORD_ALERT, &[1, 90]), Control::Ignore);
        assert_eq!(parse_control(RECORD_ALERT, &[2, 20]), Control::Alert(20));
        assert!(matches!(
            parse_control(RECORD_ALERT, &[2]),
            Control::Fail(_)
        ));
        assert_eq!(
            parse_control(RECORD_HANDSHAKE, &[24, 0, 0, 1, 0]),
            Control::KeyUpdate { requested: false }
        );
        assert_eq!(
            parse_control(RECORD_HANDSHAKE, &[24, 0, 0, 1, 1]),
            Control::KeyUpdate { requested: true }
        );
        // A KeyUpdate with a bad request value or length, a ticket from the client, two
        // messages in one record, a ChangeCipherSpec: all end the connection.
        for (kind, payload) in [
            (RECORD_HANDSHAKE, &[24, 0, 0, 1, 2][..]),
            (RECORD_HANDSHAKE, &[24, 0, 0, 2, 0, 0]),
            (RECORD_HANDSHAKE, &[4, 0, 0, 0]),
            (RECORD_HANDSHAKE, &[24, 0, 0, 1, 0, 24, 0, 0, 1, 0]),
            (20, &[1]),
        ] {
            assert!(
                matches!(parse_control(kind, payload), Control::Fail(_)),
                "{kind} {payload:?}"
            );
        }
    }
}
