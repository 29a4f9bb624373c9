//! Copying one proxied TCP connection both ways, with back-pressure and half-close.
//!
//! Two ways, both measured by `benches/userspace.rs`:
//! - [`CopyMethod::Splice`]: `splice(2)` socket → pipe → socket. The bytes never enter
//!   userspace; each direction reads only once its pipe is drained, so a slow reader stalls the
//!   writer (back-pressure through the socket buffers). A direction borrows a pipe from its
//!   thread's pool for a burst of bytes and returns it empty, so an idle connection holds two
//!   sockets and no pipe. Messages are read first into the thread's small buffer (see
//!   [`SMALL`]): a request or response that fits moves with one `recv` and one `send`, and the
//!   short read tells that the socket is drained, so no further read is made to hear `EAGAIN`.
//!   Only a read that fills the buffer turns the direction to splice.
//! - [`CopyMethod::Buffered`]: `tokio::io::copy_bidirectional_with_sizes` with 64 KiB buffers
//!   per direction, for comparison and for kernels where splice misbehaves.
//!
//! End of stream in one direction is passed on as a `shutdown(SHUT_WR)` of the other socket
//! (half-close); the connection ends when both directions have, and the second end of stream is
//! passed on by closing both sockets (the same FIN, one system call less).

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::{MsgFlags, recv, send};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMethod {
    /// Zero-copy `splice(2)` through a pipe per direction (Linux).
    #[default]
    Splice,
    /// A userspace buffer per direction.
    Buffered,
}

impl CopyMethod {
    /// `KPROXY_USERSPACE_COPY=buffered` selects the buffered copy (for comparisons and for
    /// kernels where splice misbehaves); anything else, or nothing, selects splice.
    pub fn from_env() -> CopyMethod {
        match std::env::var("KPROXY_USERSPACE_COPY").as_deref() {
            Ok("buffered") => CopyMethod::Buffered,
            _ => CopyMethod::Splice,
        }
    }
}

/// The buffer (and pipe) size per direction.
const CHUNK: usize = 1024 * 1024;

/// Copies until both directions ended. Errors (a reset) end both.
pub(super) async fn copy(
    method: CopyMethod,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
) -> io::Result<(u64, u64)> {
    if method == CopyMethod::Splice {
        let ended = AtomicBool::new(false);
        return tokio::try_join!(
            splice_one(client, upstream, &ended),
            splice_one(upstream, client, &ended)
        );
    }
    tokio::io::copy_bidirectional_with_sizes(client, upstream, 64 * 1024, 64 * 1024).await
}

/// A non-blocking pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe moves more per splice; the default (64 KiB) still works when the
        // system limit (fs.pipe-max-size) refuses.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        Ok(Pipe { read, write })
    }
}

/// Empty pipes kept per data-path thread for the next burst of bytes.
const POOL_MAX: usize = 64;

thread_local! {
    /// Each worker thread's spare pipes (every one empty). A connection takes a pipe only while
    /// bytes move in one direction and gives it back once that direction has nothing to move, so
    /// an idle connection holds no pipe, and a short request costs no `pipe2`/`fcntl`/`close`.
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe borrowed from the pool; back to the pool when dropped empty, closed otherwise.
struct Lent {
    pipe: Option<Pipe>,
    /// Bytes in the pipe.
    held: usize,
}

impl Lent {
    fn take() -> io::Result<Lent> {
        let pooled = PIPES.with(|p| p.borrow_mut().pop());
        let pipe = match pooled {
            Some(p) => p,
            None => Pipe::new()?,
        };
        Ok(Lent {
            pipe: Some(pipe),
            held: 0,
        })
    }

    fn pipe(&self) -> &Pipe {
        // Present from `take` until drop.
        self.pipe.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take()
            && self.held == 0
        {
            PIPES.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_MAX {
                    p.push(pipe);
                }
            });
        }
    }
}

/// Moves `src` → pipe → `dst` until `src` has nothing more right now and the pipe is drained.
/// Returns the bytes moved and whether `src` reached its end.
async fn burst(src: &TcpStream, dst: &TcpStream, lent: &mut Lent) -> io::Result<(u64, bool)> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // Fill the pipe from the socket (it is empty here).
        let n = match src.try_io(Interest::READABLE, || {
            splice(src, None, &lent.pipe().write, None, CHUNK, flags).map_err(io::Error::from)
        }) {
            Ok(0) => return Ok((total, true)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((total, false)),
            Err(e) => return Err(e),
        };
        lent.held = n;
        while lent.held > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(&lent.pipe().read, None, dst, None, lent.held, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => lent.held -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// The size of each data-path thread's buffer for messages. A read shorter than this has
/// drained the socket's receive queue (TCP copies everything queued up to the size asked), which
/// is what lets a request or response skip the read that would only return `EAGAIN`; a read that
/// fills it turns the direction to splice for the rest of the burst.
pub(super) const SMALL: usize = 16 * 1024;

thread_local! {
    /// Each worker thread's message buffer; borrowed only inside one synchronous read and send,
    /// never across an `.await`.
    static MESSAGE: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SMALL].into_boxed_slice());
}

/// What one read into the message buffer did.
enum Small {
    /// `src` reached its end.
    End,
    /// Nothing was queued.
    Empty,
    /// Bytes were moved; `rest` is what `dst` did not take at once (empty unless its send buffer
    /// is full). `drained`: the read was short, so nothing more was queued.
    Moved {
        n: usize,
        rest: Vec<u8>,
        drained: bool,
    },
}

/// Reads once from `src` into the thread's buffer and sends what came to `dst`. After a short
/// read it tells tokio that `src` is no longer readable (by answering `WouldBlock` from inside
/// `try_io`), as a read returning `EAGAIN` would have: bytes or an end of stream arriving later
/// raise a new readiness event, and tokio never clears an end of stream it has seen, so nothing
/// that arrives is missed.
fn read_small(src: &TcpStream, dst: &TcpStream) -> io::Result<Small> {
    let mut outcome = None;
    let read = src.try_io(Interest::READABLE, || {
        MESSAGE.with(|buf| {
            let mut buf = buf.borrow_mut();
            let n = recv(src.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if n == 0 {
                outcome = Some(Small::End);
                return Ok(());
            }
            // A plain `send`, not tokio's `try_write`: a stream tokio took over from a std
            // socket (the endpoint's, connected without the reactor, or a connection another
            // worker took) has no readiness until the reactor's first event, and `try_write`
            // would then answer `WouldBlock` without trying, costing a copy and a reactor turn.
            let sent = match send(dst.as_raw_fd(), &buf[..n], MsgFlags::MSG_NOSIGNAL) {
                Ok(m) => m,
                Err(Errno::EAGAIN) => 0,
                Err(e) => return Err(e.into()),
            };
            let drained = n < buf.len();
            outcome = Some(Small::Moved {
                n,
                rest: buf[sent..n].to_vec(),
                drained,
            });
            if drained {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        })
    });
    match (outcome, read) {
        (Some(small), _) => Ok(small),
        (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(Small::Empty),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Ok(Small::Empty),
    }
}

/// Sends all of `rest` to `dst`, waiting while its send buffer is full.
async fn send_rest(dst: &TcpStream, mut rest: &[u8]) -> io::Result<()> {
    while !rest.is_empty() {
        match dst.try_write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => rest = &rest[m..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One direction: `src` → `dst`, then half-close `dst`. Messages go through the thread's
/// buffer; a burst larger than it goes through a pipe, held only during the burst. After a burst
/// that was larger, the next one splices from the start (a bulk transfer pays no extra copy).
///
/// `ended` is shared by the two directions of one connection and set by the first to end. The
/// second one to end skips its `shutdown`: the connection closes at once, and closing a socket
/// whose input has all been read sends the same FIN (one system call less per connection, as
/// HAProxy does).
async fn splice_one(src: &TcpStream, dst: &TcpStream, ended: &AtomicBool) -> io::Result<u64> {
    let mut total = 0u64;
    let mut bulk = false;
    loop {
        src.readable().await?;
        let mut end = false;
        if !bulk {
            match read_small(src, dst)? {
                Small::End => end = true,
                Small::Empty => continue,
                Small::Moved { n, rest, drained } => {
                    send_rest(dst, &rest).await?;
                    total += n as u64;
                    if drained {
                        continue;
                    }
                }
            }
        }
        if !end {
            let mut lent = Lent::take()?;
            let (n, at_end) = burst(src, dst, &mut lent).await?;
            drop(lent);
            total += n;
            bulk = n >= SMALL as u64;
            end = at_end;
        }
        if end {
            // Peer closed its side: pass the end of stream on, keep the other direction open
            // (unless it has ended too: then closing passes it on).
            if !ended.swap(true, Ordering::Relaxed) {
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            }
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::io::{Read as _, Write as _};

    use super::{Small, read_small};

    /// A message goes out at once even to a stream tokio has had no event for yet, as the
    /// endpoint's is when `tcp::connect` found it connected: the send is tried, not refused by
    /// tokio's empty readiness (which would leave the message for a later turn of the reactor).
    #[test]
    fn a_message_goes_out_at_once_to_a_stream_tokio_has_no_readiness_for() {
        let rt = crate::datapath::tests::io_runtime();
        rt.block_on(async {
            // The source: accepted by tokio, so ready from the start.
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (src, _) = listener.accept().await.unwrap();
            // The destination: a connected std socket handed over to tokio.
            let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let dst = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
            dst.set_nonblocking(true).unwrap();
            let dst = tokio::net::TcpStream::from_std(dst).unwrap();
            let (mut endpoint, _) = server.accept().unwrap();
            // On loopback the bytes are queued at the source by the time `write_all` returns.
            client.write_all(&[7u8; 100]).unwrap();
            let Small::Moved { n, rest, drained } = read_small(&src, &dst).unwrap() else {
                panic!("the message was not read");
            };
            assert_eq!(n, 100);
            assert!(drained);
            assert!(
                rest.is_empty(),
                "{} bytes were left for a later turn of the reactor",
                rest.len()
            );
            let mut got = [0u8; 100];
            endpoint.read_exact(&mut got).unwrap();
            assert_eq!(got, [7u8; 100]);
        });
    }
}
