//! Copying one proxied TCP connection both ways, with back-pressure and half-close.
//!
//! Two ways, both measured by `benches/userspace.rs`:
//! - [`CopyMethod::Splice`]: `splice(2)` socket → pipe → socket, one pipe per direction. The
//!   bytes never enter userspace; each direction reads only once its pipe is drained, so a slow
//!   reader stalls the writer (back-pressure through the socket buffers).
//! - [`CopyMethod::Buffered`]: `tokio::io::copy_bidirectional_with_sizes` with 64 KiB buffers,
//!   the portable fallback (used when a pipe cannot be created, e.g. out of file descriptors).
//!
//! End of stream in one direction is passed on as a `shutdown(SHUT_WR)` of the other socket
//! (half-close); the connection ends when both directions have.

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
        match (Pipe::new(), Pipe::new()) {
            (Ok(up), Ok(down)) => {
                return tokio::try_join!(
                    splice_one(client, upstream, &up),
                    splice_one(upstream, client, &down)
                );
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "no pipe for splice; copying through a buffer");
            }
        }
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

/// One direction: `src` → pipe → `dst`, then half-close `dst`.
async fn splice_one(src: &TcpStream, dst: &TcpStream, pipe: &Pipe) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so EAGAIN can only mean "no data on the socket yet".
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src, None, &pipe.write, None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // Peer closed its side: pass the end of stream on, keep the other direction open.
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, dst, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}
