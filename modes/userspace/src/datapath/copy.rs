//! Copying one proxied TCP connection both ways, with back-pressure and half-close.
//!
//! Two ways, both measured by `benches/userspace.rs`:
//! - [`CopyMethod::Splice`]: `splice(2)` socket → pipe → socket. The bytes never enter
//!   userspace; each direction reads only once its pipe is drained, so a slow reader stalls the
//!   writer (back-pressure through the socket buffers). A direction borrows a pipe from its
//!   thread's pool for a burst of bytes and returns it empty, so an idle connection holds two
//!   sockets and no pipe, and a short request/response creates no pipe at all.
//! - [`CopyMethod::Buffered`]: `tokio::io::copy_bidirectional_with_sizes` with 64 KiB buffers
//!   per direction, for comparison and for kernels where splice misbehaves.
//!
//! End of stream in one direction is passed on as a `shutdown(SHUT_WR)` of the other socket
//! (half-close); the connection ends when both directions have.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
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
        return tokio::try_join!(splice_one(client, upstream), splice_one(upstream, client));
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

/// One direction: `src` → pipe → `dst`, then half-close `dst`. A pipe is held only during a
/// burst of bytes.
async fn splice_one(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let mut lent = Lent::take()?;
        let (n, end) = burst(src, dst, &mut lent).await?;
        drop(lent);
        total += n;
        if end {
            // Peer closed its side: pass the end of stream on, keep the other direction open.
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            return Ok(total);
        }
    }
}
