//! A worker about to sleep takes the connections waiting in busy workers' accept queues.
//!
//! Each worker has its own `SO_REUSEPORT` socket on a listener address, and the kernel picks the
//! socket for a new connection by a hash of its addresses, not by which worker is free. So when
//! a worker's thread is busy, or its core is taken by other processes, the connections hashed to
//! it wait in its queue while another worker sleeps. With client, proxy and server sharing two
//! cores (`benches/userspace.rs`, conn/s), this left 6–7% of the machine idle, against under 1%
//! for HAProxy, whose threads share one queue.
//!
//! One shared socket per listener would let any worker accept, but the kernel then wakes every
//! sleeping worker for every connection: measured, idle fell to 1.5%, and each connection cost
//! 8% more CPU, for no gain in rate. Instead, every TCP listener socket is also registered,
//! level-triggered, in one more epoll on which no thread ever sleeps, so it wakes nobody. Right
//! before a worker's runtime would sleep (tokio's `on_thread_park`, which runs whatever the hook
//! spawns instead of sleeping), the worker asks that epoll which sockets have connections
//! waiting and takes one from each. The cost is one `epoll_wait` with a zero timeout each time a
//! worker would sleep; a busy worker never sleeps, so it never looks.
//!
//! A socket is registered at its first connection, not when it opens: each registration holds a
//! kernel epoll item (`eventpoll_epi`, 128 bytes here, and its wait-queue entry), a duplicate
//! descriptor and a slab entry, and most listeners of a large cluster never see a connection on
//! a given node. So stealing is a remedy for imbalance, never needed for correctness: a
//! connection nobody takes is accepted by its owner, as without it.
//!
//! A taken connection is served by the taker exactly as its owner would serve it
//! ([`tcp::handle`]). A listener's registration ends before its socket's last connections are
//! taken and the socket closed (see [`tcp::serve`]), so a closed listener is never accepted on.

use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::{Arc, Mutex};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::net::{TcpListener, TcpStream};

use super::{ListenerState, Shared, tcp};

/// Sockets looked at per sleep: one connection is taken from each.
const BATCH: usize = 8;

/// Every TCP listener socket of the data path, in an epoll that only reports readiness.
pub(crate) struct Spare {
    epoll: Epoll,
    sockets: Mutex<Slab<Entry>>,
}

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.sockets.lock().map_or(0, |s| s.len());
        f.debug_struct("Spare").field("sockets", &n).finish()
    }
}

/// A registered socket and what serving its connections takes. `fd` is a duplicate of the
/// accept loop's descriptor, so the loop keeps its socket inline (no allocation per listener);
/// it is removed from the epoll before it is closed (closing one of two descriptors of a socket
/// would leave the registration in place).
struct Entry {
    fd: OwnedFd,
    state: Arc<ListenerState>,
    shared: Arc<Shared>,
}

/// A socket's registration; dropping it ends the registration (the socket stays open as long
/// as its accept loop holds it).
pub(super) struct Registration {
    spare: Arc<Spare>,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut sockets) = self.spare.sockets.lock()
            && let Some(entry) = sockets.try_remove(self.key)
        {
            let _ = self.spare.epoll.delete(&entry.fd);
        }
    }
}

impl Spare {
    pub(super) fn new() -> io::Result<Arc<Spare>> {
        Ok(Arc::new(Spare {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            sockets: Mutex::new(Slab::new()),
        }))
    }

    /// Lets other workers take `listener`'s waiting connections until the registration is
    /// dropped. `None` when the descriptor cannot be duplicated or the epoll refuses it (out of
    /// descriptors or memory): the owner still serves it alone.
    pub(super) fn register(
        self: &Arc<Self>,
        listener: &TcpListener,
        state: &Arc<ListenerState>,
        shared: &Arc<Shared>,
    ) -> Option<Registration> {
        let fd = listener.as_fd().try_clone_to_owned().ok()?;
        let mut sockets = self.sockets.lock().ok()?;
        let slot = sockets.vacant_entry();
        let key = slot.key();
        self.epoll
            .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, key as u64))
            .ok()?;
        slot.insert(Entry {
            fd,
            state: state.clone(),
            shared: shared.clone(),
        });
        Some(Registration {
            spare: self.clone(),
            key,
        })
    }

    /// Run by a worker right before its runtime would sleep: takes one waiting connection from
    /// each socket that has one (up to [`BATCH`]) and spawns its handling on this worker, which
    /// then runs it instead of sleeping.
    pub(super) fn before_park(&self) {
        let mut events = [EpollEvent::empty(); BATCH];
        let Ok(n) = self.epoll.wait(&mut events, EpollTimeout::ZERO) else {
            return;
        };
        for event in &events[..n] {
            let Ok(key) = usize::try_from(event.data()) else {
                continue;
            };
            // Accepted under the lock: a registration dropped meanwhile cannot close the socket
            // under this accept.
            let taken = {
                let Ok(sockets) = self.sockets.lock() else {
                    return;
                };
                let Some(entry) = sockets.get(key) else {
                    continue;
                };
                if entry.state.is_stopped() {
                    continue;
                }
                match socket2::SockRef::from(&entry.fd).accept() {
                    Ok((conn, peer)) => peer
                        .as_socket()
                        .map(|peer| (conn, peer, entry.state.clone(), entry.shared.clone())),
                    // Its owner, or another worker, took it first.
                    Err(_) => None,
                }
            };
            let Some((conn, peer, state, shared)) = taken else {
                continue;
            };
            let conn: std::net::TcpStream = conn.into();
            if conn.set_nonblocking(true).is_err() {
                continue;
            }
            if let Ok(client) = TcpStream::from_std(conn) {
                tokio::spawn(tcp::handle(client, peer, state, shared));
            }
        }
    }
}
