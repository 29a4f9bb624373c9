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
//! 8% more CPU, for no gain in rate. Instead, every TCP listener socket that has had a
//! connection is also registered, level-triggered, in one more epoll on which no thread ever
//! sleeps, so it wakes nobody. Each time a worker's run queue empties, right before its runtime
//! would sleep (tokio's `on_thread_park`, which runs whatever the hook spawns instead of
//! sleeping), the worker asks that epoll which sockets have connections waiting and takes one
//! from each. The cost is one `epoll_wait` with a zero timeout each time a run queue empties;
//! after four looks in a row that found nothing, a worker looks less often, down to once in 33
//! ([`skips_after`]), and again every time as soon as a look finds one.
//!
//! A socket is registered at its first connection, not when it opens: each registration holds a
//! kernel epoll item (`eventpoll_epi`, 128 bytes here, and its wait-queue entry), a duplicate
//! descriptor and a slab entry, and most listeners of a large cluster never see a connection on
//! a given node. So stealing is a remedy for imbalance, never needed for correctness: a
//! connection nobody takes is accepted by its owner, as without it. For the same reason the
//! registrations stop at a cap (the listener socket budget, a quarter of the open-file limit),
//! so they never take more than that share of the descriptors connections need: past it, a
//! listener seeing its first connection is served by its own worker alone, and it is not
//! offered again later (its accept loop offers a socket once).
//!
//! A taken connection is served by the taker exactly as its owner would serve it, through the
//! same [`tcp::take_queued`] that a closing listener empties its queue with. A listener's
//! registration ends before its socket's last connections are taken and the socket closed (see
//! [`tcp::serve`]), so a closed listener is never accepted on.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::{Arc, PoisonError, RwLock};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::net::TcpListener;

use super::tcp;
use super::{ListenerState, Shared};

/// Sockets looked at each time: one connection is taken from each.
const BATCH: usize = 8;

/// Looks in a row that found nothing before a worker starts skipping some.
const PATIENCE: u32 = 4;
/// The most run-queue empties skipped between two looks.
const MAX_SKIP: u32 = 32;

/// How many times to skip looking after `misses` looks in a row found nothing: none at first,
/// then 1, 2, 4, … up to [`MAX_SKIP`]. Where connections wait in other queues (the conn/s
/// bench: half the looks find one) a worker looks nearly every time; where none ever do (UDP
/// traffic only) it looks once in 33. Measured with UDP only, the same binary with and without
/// taking: a look at every empty run queue cost 4.6% of the 4-flow round-trip rate (about
/// 100,000 looks per kproxy run, none finding anything); with this schedule 4 flows were 4%
/// behind and 64 and 1,024 flows 6% ahead, over identical spreads.
fn skips_after(misses: u32) -> u32 {
    if misses < PATIENCE {
        0
    } else {
        (1u32 << (misses - PATIENCE).min(31)).min(MAX_SKIP)
    }
}

thread_local! {
    /// This worker's looks in a row that found nothing, and how many times it will not look.
    static BACKOFF: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
}

/// Every TCP listener socket of the data path, in an epoll that only reports readiness.
pub(crate) struct Spare {
    epoll: Epoll,
    /// Read-locked while a connection is taken (several workers may take at once), write-locked
    /// to register and deregister: a socket is never closed under an accept.
    sockets: RwLock<Slab<Entry>>,
    /// The most sockets registered at once.
    cap: usize,
}

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .sockets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
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
        // A poisoned lock still holds a consistent slab (nothing in it panics while locked);
        // skipping the removal would keep the socket open through its duplicate descriptor.
        let mut sockets = self
            .spare
            .sockets
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = sockets.try_remove(self.key) {
            let _ = self.spare.epoll.delete(&entry.fd);
        }
    }
}

impl Spare {
    /// Holds up to `cap` registrations at once (each a descriptor and an epoll item).
    pub(super) fn new(cap: usize) -> io::Result<Arc<Spare>> {
        Ok(Arc::new(Spare {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            sockets: RwLock::new(Slab::new()),
            cap,
        }))
    }

    /// Lets other workers take `listener`'s waiting connections until the registration is
    /// dropped. `None` when the cap is reached, or the descriptor cannot be duplicated or the
    /// epoll refuses it (out of descriptors or memory): the owner still serves it alone.
    pub(super) fn register(
        self: &Arc<Self>,
        listener: &TcpListener,
        state: &Arc<ListenerState>,
        shared: &Arc<Shared>,
    ) -> Option<Registration> {
        let mut sockets = self.sockets.write().unwrap_or_else(PoisonError::into_inner);
        if sockets.len() >= self.cap {
            tracing::debug!(listener = %state.key, cap = self.cap, "idle workers take no connections from this listener: registrations are at their cap");
            return None;
        }
        let fd = listener.as_fd().try_clone_to_owned().ok()?;
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

    /// Run by a worker each time its run queue empties, right before its runtime would sleep:
    /// takes one waiting connection from each socket that has one (up to [`BATCH`]) and spawns
    /// its handling on this worker, which then runs it instead of sleeping. After looks that
    /// found nothing it skips some ([`skips_after`]).
    pub(super) fn before_park(&self) {
        let (misses, skips) = BACKOFF.get();
        if skips > 0 {
            BACKOFF.set((misses, skips - 1));
            return;
        }
        let mut events = [EpollEvent::empty(); BATCH];
        let n = self
            .epoll
            .wait(&mut events, EpollTimeout::ZERO)
            .unwrap_or(0);
        if n == 0 {
            let misses = misses.saturating_add(1);
            BACKOFF.set((misses, skips_after(misses)));
            return;
        }
        BACKOFF.set((0, 0));
        for event in &events[..n] {
            let Ok(key) = usize::try_from(event.data()) else {
                continue;
            };
            // Taken under the lock: a registration dropped meanwhile cannot close the socket
            // under this accept. The connection counts as live from the accept, before its
            // owner's handover could see none left and exit. (A stopping listener's queue may be
            // taken too: its owner takes it the same way before closing.) An error: its owner, or
            // another worker, took it first.
            let sockets = self.sockets.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = sockets.get(key) {
                let _ = tcp::take_queued(
                    socket2::SockRef::from(&entry.fd),
                    &entry.state,
                    &entry.shared,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use arc_swap::ArcSwap;
    use tokio::net::TcpListener;

    use super::{Spare, skips_after};
    use crate::datapath::{Active, ListenerState, Options, Shared};
    use crate::model::{ListenerKey, Transport};

    /// Registrations past the cap are refused (the listener is then served by its own worker
    /// alone), and a dropped registration frees its place.
    #[test]
    fn registrations_stop_at_the_cap_and_a_dropped_one_frees_its_place() {
        let rt = crate::datapath::tests::io_runtime();
        let _in = rt.enter();
        let shared = Arc::new(Shared {
            tables: ArcSwap::from_pointee(HashMap::new()),
            generation: tokio::sync::watch::channel(0).0,
            options: Options::default(),
            connections: AtomicUsize::new(0),
            spare: None,
        });
        let listeners: Vec<(TcpListener, Arc<ListenerState>)> = (0..3)
            .map(|_| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.set_nonblocking(true).unwrap();
                let key = ListenerKey {
                    transport: Transport::Tcp,
                    addr: l.local_addr().unwrap(),
                };
                let active = Active {
                    table: crate::datapath::tests::table(key.addr),
                    affinity: None,
                };
                let state = Arc::new(ListenerState::new(key, active));
                (TcpListener::from_std(l).unwrap(), state)
            })
            .collect();
        let spare = Spare::new(2).unwrap();
        let register = |i: usize| spare.register(&listeners[i].0, &listeners[i].1, &shared);
        let first = register(0).expect("the first registration");
        let second = register(1).expect("the second registration");
        assert!(
            register(2).is_none(),
            "a third registration past a cap of 2"
        );
        drop(first);
        let third = register(2).expect("the place the first one freed");
        assert!(register(0).is_none(), "the cap still holds");
        drop((second, third));
    }

    #[test]
    fn a_worker_looks_less_often_after_misses_and_never_less_than_once_in_33() {
        let schedule: Vec<u32> = (0..12).map(skips_after).collect();
        assert_eq!(schedule, [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(skips_after(u32::MAX), 32);
    }
}
