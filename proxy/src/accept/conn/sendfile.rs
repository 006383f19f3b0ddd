//! Response bodies that are ranges of open files, for a transport that sends a file's bytes
//! with `sendfile` instead of reading them (a kernel TLS socket: the kernel encrypts straight
//! from the page cache).
//!
//! hyper writes every byte of a body itself; a body cannot hand it a file. So a file body is a
//! run of placeholder chunks: slices of one static buffer that nothing else uses, each standing
//! for as many bytes of a file range that the body queued on its connection's [`FileSender`]
//! when it yielded the chunk. The transport, asked to write such a slice, sends the oldest queued
//! range instead ([`FileSender::poll_write_vectored`]); every other slice (the response head,
//! chunk framing, other bodies) goes out as it is. hyper keeps body buffers by reference when it
//! writes vectored, which [`super::deadline::serve`] asks for, so placeholders reach the
//! transport intact; `a_file_body_goes_out_byte_exact_through_hyper` holds hyper to that. A
//! placeholder the transport cannot account for is an error, never zeros on the wire.

use std::{
    collections::VecDeque,
    fs::File,
    io::{self, IoSlice},
    os::fd::AsRawFd,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use prometheus_client::metrics::counter::Counter;
use tokio::{io::Interest, net::TcpStream};

use crate::{
    origins::client::{BoxError, ProxyBody},
    registry::SendsFiles,
};

/// Bytes one placeholder chunk stands for at most. hyper stops asking a body for chunks while
/// about 400 KiB are queued, so each chunk is written (sent) before the next is asked for.
pub(crate) const CHUNK: usize = 1 << 20;

/// The placeholders' bytes. Never read: a slice of it on its way to the socket is replaced.
static PLACEHOLDER: [u8; CHUNK] = [0; CHUNK];

/// A file range a placeholder stands for.
struct Region {
    file: Arc<File>,
    offset: u64,
    len: usize,
}

/// The file ranges a connection's file bodies have handed out and its transport has not sent
/// yet, oldest first. Cheap to clone; one per connection.
#[derive(Clone)]
pub(crate) struct FileSender {
    queue: Arc<Mutex<VecDeque<Region>>>,
    /// Bytes sent with `sendfile`.
    sent: Counter,
}

impl std::fmt::Debug for FileSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSender")
            .field("queued", &self.queue.lock().expect("file queue").len())
            .finish()
    }
}

impl SendsFiles for FileSender {
    fn file_body(&self, file: Arc<File>, start: u64, end: u64) -> ProxyBody {
        self.body(file, start, end).boxed_unsync()
    }
}

impl FileSender {
    /// A sender counting what it sends in `sent`.
    pub(crate) fn new(sent: Counter) -> Self {
        Self {
            queue: Arc::default(),
            sent,
        }
    }

    /// A body of `file`'s bytes `start..end`, sent by this connection's transport.
    pub(crate) fn body(&self, file: Arc<File>, start: u64, end: u64) -> FileBody {
        FileBody {
            file,
            pos: start,
            end: end.max(start),
            queue: self.queue.clone(),
        }
    }

    /// How many bytes `slice` stands for, if it is a placeholder.
    fn placeholder_len(slice: &[u8]) -> Option<usize> {
        let base = PLACEHOLDER.as_ptr() as usize;
        let at = slice.as_ptr() as usize;
        (at >= base && at < base + CHUNK && !slice.is_empty()).then_some(slice.len())
    }

    /// Writes `bufs` to `io` in order, sending file ranges where they hold placeholders; returns
    /// how many bytes (of `bufs`) went, like `writev`. Stops at the first write that the socket
    /// takes only in part.
    pub(crate) fn poll_write_vectored(
        &self,
        io: &TcpStream,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut written = 0;
        let mut i = 0;
        while i < bufs.len() {
            let (step, wanted) = match Self::placeholder_len(&bufs[i]) {
                Some(len) => {
                    i += 1;
                    (self.poll_send_file(io, cx, len), len)
                }
                None => {
                    let run = bufs[i..]
                        .iter()
                        .position(|b| Self::placeholder_len(b).is_some())
                        .map_or(bufs.len(), |p| i + p);
                    let wanted = bufs[i..run].iter().map(|b| b.len()).sum();
                    let step = poll_writev(io, cx, &bufs[i..run]);
                    i = run;
                    (step, wanted)
                }
            };
            match step {
                Poll::Ready(Ok(n)) => {
                    written += n;
                    if n < wanted {
                        break;
                    }
                }
                // What went before counts; the error (or the wait) comes back on the next call.
                Poll::Ready(Err(_)) | Poll::Pending if written > 0 => break,
                other => return other,
            }
        }
        Poll::Ready(Ok(written))
    }

    /// Sends (part of) the oldest queued range for a placeholder of `len` bytes.
    fn poll_send_file(
        &self,
        io: &TcpStream,
        cx: &mut Context<'_>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let (file, offset) = {
            let queue = self.queue.lock().expect("file queue");
            match queue.front() {
                // A placeholder's slice is always the whole rest of its chunk.
                Some(r) if r.len == len => (r.file.clone(), r.offset),
                _ => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a placeholder chunk without its file range",
                    )));
                }
            }
        };
        loop {
            ready!(io.poll_write_ready(cx))?;
            match io.try_io(Interest::WRITABLE, || sendfile(io, &file, offset, len)) {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ended before its range",
                    )));
                }
                Ok(n) => {
                    let mut queue = self.queue.lock().expect("file queue");
                    if let Some(r) = queue.front_mut() {
                        r.offset += n as u64;
                        r.len -= n;
                        if r.len == 0 {
                            queue.pop_front();
                        }
                    }
                    self.sent.inc_by(n as u64);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// `sendfile(2)`: up to `count` bytes of `file` at `offset` to the socket, without reading them
/// into user space. Returns how many went.
fn sendfile(socket: &impl AsRawFd, file: &File, offset: u64, count: usize) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: both descriptors are open for the call; `off` is a valid off_t the kernel updates.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, count) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn poll_writev(
    io: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(io.poll_write_ready(cx))?;
        match io.try_write_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => return Poll::Ready(other),
        }
    }
}

/// A file range as a response body: placeholder chunks of at most [`CHUNK`] bytes, each queued
/// with its range when yielded.
pub(crate) struct FileBody {
    file: Arc<File>,
    pos: u64,
    end: u64,
    queue: Arc<Mutex<VecDeque<Region>>>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let left = self.end - self.pos;
        if left == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
        let region = Region {
            file: self.file.clone(),
            offset: self.pos,
            len,
        };
        self.queue.lock().expect("file queue").push_back(region);
        self.pos += len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &PLACEHOLDER[..len],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, io::Write as _, time::Duration};

    use http::{Request, Response, StatusCode, header};
    use hyper::body::Incoming;
    use tokio::{
        io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
        net::TcpListener,
    };

    use super::*;
    use crate::accept::conn::{Deadlines, Reset, deadline::serve};

    /// A plain TCP transport that sends file bodies like the kernel TLS one does, so the
    /// placeholder path runs on any kernel.
    struct FileTransport {
        io: TcpStream,
        files: FileSender,
    }

    impl AsyncRead for FileTransport {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for FileTransport {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.files
                .poll_write_vectored(&self.io, cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.files.poll_write_vectored(&self.io, cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    impl Reset for FileTransport {
        fn reset_on_drop(&self) {
            self.io.reset_on_drop();
        }
    }

    const D: Deadlines = Deadlines {
        handshake: Duration::from_secs(10),
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        write: Duration::from_secs(60),
    };

    /// 3 MiB and a bit of non-repeating bytes in a file.
    fn content() -> (tempfile::NamedTempFile, Vec<u8>) {
        let data: Vec<u8> = (0..(3 << 20) + 4321u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        (f, data)
    }

    /// Serves `GET /file` (with an optional `Range: bytes=A-B`) from `file` as a file body and
    /// `GET /small` as an ordinary body, on one connection accepted from `listener`.
    async fn serve_one(listener: TcpListener, file: Arc<File>, len: u64, sent: Counter) {
        let (io, _) = listener.accept().await.unwrap();
        let files = FileSender::new(sent);
        let transport = FileTransport {
            io,
            files: files.clone(),
        };
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (files, file) = (files.clone(), file.clone());
            async move {
                if req.uri().path() == "/small" {
                    return Ok::<_, Infallible>(Response::new(crate::origins::client::full(
                        "small",
                    )));
                }
                let range = req
                    .headers()
                    .get(header::RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes="))
                    .and_then(|v| v.split_once('-'))
                    .map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap() + 1));
                let (start, end) = range.unwrap_or((0, len));
                let mut resp = Response::new(files.body(file, start, end).boxed_unsync());
                if range.is_some() {
                    *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
                }
                resp.headers_mut()
                    .insert(header::CONTENT_LENGTH, (end - start).into());
                Ok(resp)
            }
        });
        serve(transport, service, D).await;
    }

    /// Reads one response (head and `Content-Length` body) from `client`.
    async fn response(client: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(pending[..end].to_vec()).unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.parse().unwrap())
                    })
                    .unwrap();
                while pending.len() < end + 4 + len {
                    let n = client.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed mid-body");
                    pending.extend_from_slice(&buf[..n]);
                }
                let body = pending[end + 4..end + 4 + len].to_vec();
                pending.drain(..end + 4 + len);
                return (head, body);
            }
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a response");
            pending.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_file_body_goes_out_byte_exact_through_hyper() {
        let (file, data) = content();
        let len = data.len() as u64;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Counter::default();
        let server = tokio::spawn(serve_one(
            listener,
            Arc::new(file.reopen().unwrap()),
            len,
            sent.clone(),
        ));
        let mut client = TcpStream::connect(addr).await.unwrap();
        // Read slowly at first, so that sendfile meets a full socket and resumes mid-range.
        client
            .write_all(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut pending = Vec::new();
        let (head, body) = response(&mut client, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body == data, "the whole file, byte for byte");

        // Keep-alive: an ordinary body, a range across a chunk boundary, and the whole file
        // again, one after another on the same connection.
        let (start, end) = (CHUNK as u64 - 10, 2 * CHUNK as u64 + 7);
        client
            .write_all(
                format!(
                    "GET /small HTTP/1.1\r\nHost: x\r\n\r\n\
                     GET /file HTTP/1.1\r\nHost: x\r\nRange: bytes={start}-{end}\r\n\r\n\
                     GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let (head, body) = response(&mut client, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"small");
        let (head, body) = response(&mut client, &mut pending).await;
        assert!(head.starts_with("HTTP/1.1 206"), "{head}");
        assert!(
            body == data[start as usize..=end as usize],
            "the range, byte for byte"
        );
        let (_, body) = response(&mut client, &mut pending).await;
        assert!(body == data);
        server.await.unwrap();
        assert_eq!(
            sent.get(),
            2 * len + (end - start + 1),
            "every file byte went by sendfile"
        );
    }

    #[tokio::test]
    async fn a_placeholder_without_its_range_is_an_error_not_zeros() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got).await;
            got
        });
        let (io, _) = listener.accept().await.unwrap();
        let files = FileSender::new(Counter::default());
        let head = b"HTTP/1.1 200 OK\r\n\r\n";
        let stray = &PLACEHOLDER[..100];
        let result = std::future::poll_fn(|cx| {
            files.poll_write_vectored(&io, cx, &[IoSlice::new(head), IoSlice::new(stray)])
        })
        .await;
        // The head went; the stray placeholder did not (the next call reports it).
        assert_eq!(result.unwrap(), head.len());
        let err =
            std::future::poll_fn(|cx| files.poll_write_vectored(&io, cx, &[IoSlice::new(stray)]))
                .await
                .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        drop(io);
        assert_eq!(
            client.await.unwrap(),
            head,
            "nothing but the head reached the client"
        );
    }

    #[test]
    fn only_slices_of_the_placeholder_are_placeholders() {
        assert_eq!(FileSender::placeholder_len(&PLACEHOLDER[5..105]), Some(100));
        assert_eq!(FileSender::placeholder_len(&PLACEHOLDER[..0]), None);
        let zeros = vec![0u8; 100];
        assert_eq!(FileSender::placeholder_len(&zeros), None);
    }
}
