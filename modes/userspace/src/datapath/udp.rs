//! UDP: per-core sockets bound to the service address (so replies leave from it), one flow per
//! client address with its own connected socket towards the chosen endpoint, expired when idle.
//!
//! One listener shard (one `SO_REUSEPORT` socket on one worker thread) owns its flows outright:
//! the kernel hashes a client's 4-tuple to the same shard every time, so no flow table is shared
//! and nothing is locked. The shard's sockets (the listener and every flow's) sit in an epoll
//! instance of its own, which the worker's tokio reactor watches as one file descriptor; each
//! wake-up handles every ready socket in one pass:
//!
//! - the listener: up to [`BATCH`] datagrams in one `recvmmsg(2)` (quinn-udp's receive path),
//!   each sent on its flow's socket (a coalesced GRO buffer is passed on whole, as one GSO send);
//! - flow sockets: the endpoint's replies are received straight into the outgoing batch
//!   (`recvmmsg`), and the batch leaves from the listener in one `sendmmsg(2)` (nix).
//!
//! Buffers are per worker thread, allocated once ([`BATCH`] slots of 64 KiB each way): no
//! allocation per datagram. A flow costs a socket and a slot in the shard's tables (about 150
//! bytes of userspace memory), nothing else.

use kproxy_contract::clock::{Clock as _, SystemClock};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg, sendmsg,
};
use quinn_udp::{RecvMeta, UdpSocketState};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::pick::candidates;
use super::{ListenerState, Shared, Task};

/// The largest datagram (or coalesced GRO buffer) one slot holds.
const SLOT: usize = 65_536;
/// Datagrams per `recvmmsg`/`sendmmsg`.
pub(crate) const BATCH: usize = 32;
/// Ready sockets handled per wake-up.
const EVENTS: usize = 256;
/// The epoll token of the listener; flows use their slab index.
const LISTENER: u64 = u64::MAX;

/// Datagrams in flight through one thread: slot `i` holds `len[i]` bytes for `addr[i]`.
struct Batch {
    buf: Box<[u8]>,
    meta: [RecvMeta; BATCH],
    len: [usize; BATCH],
    addr: [Option<SocketAddr>; BATCH],
    /// GRO segment size of a coalesced buffer (0: one datagram).
    seg: [usize; BATCH],
    /// Slots in use (the outgoing batch only).
    used: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0u8; SLOT * BATCH].into_boxed_slice(),
            meta: std::array::from_fn(|_| RecvMeta::default()),
            len: [0; BATCH],
            addr: [None; BATCH],
            seg: [0; BATCH],
            used: 0,
        }
    }

    /// Receives up to `max` datagrams (one `recvmmsg`) from `socket` into the slots from `from`
    /// on. Returns how many.
    fn recv(
        &mut self,
        udp: &UdpSocketState,
        socket: &std::net::UdpSocket,
        from: usize,
        max: usize,
    ) -> io::Result<usize> {
        let Batch {
            buf,
            meta,
            len,
            addr,
            seg,
            ..
        } = self;
        let mut chunks = buf.chunks_exact_mut(SLOT).skip(from);
        let mut iovs: [IoSliceMut<'_>; BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
        let max = max.min(BATCH - from);
        let n = udp.recv(socket.into(), &mut iovs[..max], &mut meta[..max])?;
        for (k, m) in meta.iter().take(n).enumerate() {
            let i = from + k;
            len[i] = m.len;
            addr[i] = Some(m.addr);
            seg[i] = if m.stride > 0 && m.stride < m.len {
                m.stride
            } else {
                0
            };
        }
        Ok(n)
    }

    fn slot(&self, i: usize) -> &[u8] {
        &self.buf[i * SLOT..i * SLOT + self.len[i]]
    }
}

/// A thread's buffers: what came in from clients, and the replies going out.
struct Buffers {
    /// quinn-udp's receive path (its settings; it is used on every socket of the thread).
    udp: UdpSocketState,
    inbound: Batch,
    outbound: Batch,
    /// `sendmmsg` headers and destinations (reused).
    send_headers: MultiHeaders<SockaddrStorage>,
    dsts: Vec<Option<SockaddrStorage>>,
    events: Vec<EpollEvent>,
    expired: Vec<usize>,
}

impl Buffers {
    fn new() -> io::Result<Buffers> {
        // The state is made from a socket of its own (never bound), so the options quinn-udp
        // sets for QUIC (don't-fragment, ECN) never touch a proxied socket.
        let probe = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        Ok(Buffers {
            udp: UdpSocketState::new((&probe).into())?,
            inbound: Batch::new(),
            outbound: Batch::new(),
            send_headers: MultiHeaders::preallocate(BATCH, None),
            dsts: Vec::with_capacity(BATCH),
            events: vec![EpollEvent::empty(); EVENTS],
            expired: Vec::new(),
        })
    }
}

thread_local! {
    /// Allocated by the first UDP shard a worker thread runs; shared by all its shards (a shard
    /// uses them only between two awaits).
    static BUFFERS: RefCell<Option<Box<Buffers>>> = const { RefCell::new(None) };
}

struct Flow {
    socket: std::net::UdpSocket,
    client: SocketAddr,
    endpoint: SocketAddr,
    /// Milliseconds since the shard's epoch of the last datagram either way.
    last: u64,
}

/// The epoll instance, as a file descriptor tokio's reactor can watch.
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// One listener socket on one worker, with its flows.
struct Shard {
    listener: std::net::UdpSocket,
    flows: Slab<Flow>,
    by_client: HashMap<SocketAddr, usize>,
    state: Arc<ListenerState>,
    shared: Arc<Shared>,
    epoch: Instant,
    /// Whether GSO sends work here (cleared after the kernel refused one).
    gso: bool,
}

/// Serves until the listener is told to stop; dropping the shard drops every flow.
pub(super) async fn serve(
    listener: std::net::UdpSocket,
    state: Arc<ListenerState>,
    shared: Arc<Shared>,
    task: Task,
) {
    let (mut shard, epoll) = match Shard::new(listener, state, shared) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(error = %err, "cannot start a UDP listener shard");
            return;
        }
    };
    let idle = shard.shared.options.udp_idle_timeout;
    let mut sweep =
        tokio::time::interval((idle / 2).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let listener = task.listener();
    if listener.is_stopped() {
        return;
    }
    loop {
        tokio::select! {
            r = epoll.readable() => {
                let Ok(mut guard) = r else { return };
                let drained = BUFFERS.with(|b| {
                    let mut b = b.borrow_mut();
                    if b.is_none() {
                        match Buffers::new() {
                            Ok(new) => *b = Some(Box::new(new)),
                            Err(err) => {
                                tracing::error!(error = %err, "cannot set up UDP buffers");
                                return false;
                            }
                        }
                    }
                    let Some(bufs) = b.as_mut() else { return false };
                    let epoll = &epoll.get_ref().0;
                    match epoll.wait(&mut bufs.events, EpollTimeout::ZERO) {
                        Ok(n) => shard.handle(epoll, bufs, n),
                        Err(err) => {
                            tracing::debug!(error = %err, "epoll_wait failed");
                            false
                        }
                    }
                });
                // Every ready socket was read to its end: wait for the next arrival (each one
                // wakes the reactor through the epoll descriptor). Otherwise go round again.
                if drained {
                    guard.clear_ready();
                }
            }
            _ = sweep.tick() => shard.sweep(),
            () = listener.stopped() => return,
        }
    }
}

impl Shard {
    fn new(
        listener: std::net::UdpSocket,
        state: Arc<ListenerState>,
        shared: Arc<Shared>,
    ) -> io::Result<(Shard, AsyncFd<EpollFd>)> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        // tokio 1.54 deprecated its safe constructor for an I/O-safety hole (an `as_raw_fd` that
        // could name a different descriptor over time) and replaced it with an `unsafe fn`,
        // which this workspace forbids. `EpollFd` owns its descriptor (an `OwnedFd`) from
        // creation to drop and always returns it, so the hole does not apply here.
        #[allow(
            deprecated,
            reason = "sound for an owned descriptor; the replacement is unsafe, which is forbidden"
        )]
        let epoll = AsyncFd::with_interest(EpollFd(epoll), Interest::READABLE)?;
        Ok((
            Shard {
                listener,
                flows: Slab::new(),
                by_client: HashMap::new(),
                state,
                shared,
                epoch: SystemClock.now(),
                gso: true,
            },
            epoll,
        ))
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Handles `n` ready sockets (level-triggered: whatever is left is reported again).
    /// Returns whether every one was read to its end (none filled a whole batch, and the epoll
    /// set had no more ready sockets than were handled).
    fn handle(&mut self, epoll: &Epoll, bufs: &mut Buffers, n: usize) -> bool {
        let now = self.now();
        let mut drained = n < EVENTS;
        for i in 0..n {
            let token = bufs.events[i].data();
            if token == LISTENER {
                drained &= self.client_datagrams(epoll, &bufs.udp, &mut bufs.inbound, now) < BATCH;
            } else if let Ok(key) = usize::try_from(token) {
                drained &= !self.endpoint_replies(bufs, key, now);
            }
        }
        self.flush(bufs);
        drained
    }

    /// Client → endpoint: one batch from the listener, each datagram onto its flow's socket.
    /// Returns how many datagrams (or coalesced buffers) it took.
    fn client_datagrams(
        &mut self,
        epoll: &Epoll,
        udp: &UdpSocketState,
        batch: &mut Batch,
        now: u64,
    ) -> usize {
        let n = match batch.recv(udp, &self.listener, 0, BATCH) {
            Ok(n) => n,
            Err(err) => {
                if err.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!(listener = %self.state.key, error = %err, "recv failed");
                }
                return 0;
            }
        };
        for i in 0..n {
            let Some(client) = batch.addr[i] else {
                continue;
            };
            let key = match self.by_client.get(&client) {
                Some(&k) => k,
                None => match self.new_flow(epoll, client, now) {
                    Some(k) => k,
                    None => continue,
                },
            };
            let Some(flow) = self.flows.get_mut(key) else {
                continue;
            };
            flow.last = now;
            let data = batch.slot(i);
            let seg = batch.seg[i];
            let sent = if seg > 0 && data.len() > seg {
                send_gso(&flow.socket, data, seg, None, &mut self.gso)
            } else {
                flow.socket.send(data).map(drop)
            };
            if let Err(err) = sent {
                match err.kind() {
                    // The socket buffer is full: the datagram is dropped, as a router would.
                    io::ErrorKind::WouldBlock => {}
                    // ICMP unreachable from an earlier datagram: the next one picks again.
                    _ => {
                        tracing::debug!(listener = %self.state.key, endpoint = %flow.endpoint, error = %err, "send failed; dropping the flow");
                        self.remove(key);
                    }
                }
            }
        }
        n
    }

    /// Endpoint → client: the flow's replies, received into the outgoing batch. Returns whether
    /// the receive filled the batch (more may be waiting).
    fn endpoint_replies(&mut self, bufs: &mut Buffers, key: usize, now: u64) -> bool {
        let Some(flow) = self.flows.get_mut(key) else {
            return false;
        };
        if bufs.outbound.used == BATCH {
            flush_batch(&self.listener, bufs, &mut self.gso);
        }
        let out = &mut bufs.outbound;
        let from = out.used;
        match out.recv(&bufs.udp, &flow.socket, from, BATCH - from) {
            Ok(n) => {
                flow.last = now;
                for i in from..from + n {
                    out.addr[i] = Some(flow.client);
                }
                out.used += n;
                out.used == BATCH
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => false,
            // Connection refused (ICMP port unreachable) and the like: the flow ends.
            Err(_) => {
                self.remove(key);
                false
            }
        }
    }

    fn flush(&mut self, bufs: &mut Buffers) {
        flush_batch(&self.listener, bufs, &mut self.gso);
    }

    fn new_flow(&mut self, epoll: &Epoll, client: SocketAddr, now: u64) -> Option<usize> {
        let active = self.state.active.load();
        let table = &active.table;
        if !table.allows(client.ip()) {
            return None;
        }
        // UDP connects never fail, so failover happens across datagrams (an endpoint that
        // answers with ICMP unreachable ends its flow); one candidate is enough here.
        let endpoint = *candidates(
            table,
            &self.state.rr,
            active.affinity.as_deref(),
            client.ip(),
            1,
        )
        .first()?;
        let socket = match connect(endpoint) {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(listener = %self.state.key, %endpoint, error = %err, "cannot open a flow");
                return None;
            }
        };
        let key = self.flows.vacant_key();
        if let Err(err) = epoll.add(
            &socket,
            EpollEvent::new(EpollFlags::EPOLLIN, u64::try_from(key).ok()?),
        ) {
            tracing::debug!(listener = %self.state.key, error = %err, "cannot watch a flow");
            return None;
        }
        if let (Some(a), Some(timeout)) = (&active.affinity, table.affinity) {
            a.record(client.ip(), endpoint, timeout, SystemClock.now());
        }
        let key = self.flows.insert(Flow {
            socket,
            client,
            endpoint,
            last: now,
        });
        self.by_client.insert(client, key);
        Some(key)
    }

    fn remove(&mut self, key: usize) {
        if let Some(flow) = self.flows.try_remove(key) {
            self.by_client.remove(&flow.client);
            // Closing the socket takes it out of the epoll set.
        }
    }

    /// Idle flows expire; a flow to an endpoint that is gone ends at once, as the kernel modes
    /// delete its conntrack entry: the next datagram picks a live endpoint.
    fn sweep(&mut self) {
        let now = self.now();
        let idle_ms =
            u64::try_from(self.shared.options.udp_idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let key = self.state.key;
        let mut expired = std::mem::take(&mut BUFFERS.with(|b| {
            b.borrow_mut()
                .as_mut()
                .map(|b| std::mem::take(&mut b.expired))
                .unwrap_or_default()
        }));
        expired.extend(self.flows.iter().filter_map(|(k, f)| {
            (now.saturating_sub(f.last) >= idle_ms || !self.shared.keeps(&key, f.endpoint))
                .then_some(k)
        }));
        for k in expired.drain(..) {
            self.remove(k);
        }
        if self.flows.is_empty() && self.flows.capacity() > 1024 {
            self.flows.shrink_to_fit();
            self.by_client.shrink_to_fit();
        }
        BUFFERS.with(|b| {
            if let Some(b) = b.borrow_mut().as_mut() {
                b.expired = expired;
            }
        });
    }
}

/// Sends the outgoing batch from the listener, in as few `sendmmsg` calls as the kernel takes;
/// a coalesced (GRO) reply leaves as one GSO send.
fn flush_batch(listener: &std::net::UdpSocket, bufs: &mut Buffers, gso: &mut bool) {
    let Buffers {
        outbound: out,
        send_headers,
        dsts,
        ..
    } = bufs;
    let n = out.used;
    out.used = 0;
    let mut i = 0;
    while i < n {
        // A run of plain datagrams up to the next coalesced one.
        let mut j = i;
        while j < n && !(out.seg[j] > 0 && out.len[j] > out.seg[j]) {
            j += 1;
        }
        let mut at = i;
        while at < j {
            dsts.clear();
            dsts.extend(out.addr[at..j].iter().map(|a| a.map(SockaddrStorage::from)));
            let mut chunks = out.buf.chunks_exact(SLOT).enumerate().skip(at);
            let iovs: [[IoSlice<'_>; 1]; BATCH] = std::array::from_fn(|_| {
                [IoSlice::new(
                    chunks.next().map_or(&[][..], |(k, c)| &c[..out.len[k]]),
                )]
            });
            let none: [ControlMessage<'_>; 0] = [];
            match sendmmsg(
                listener.as_raw_fd(),
                send_headers,
                iovs.iter().take(j - at),
                &dsts[..],
                none,
                MsgFlags::empty(),
            ) {
                Ok(sent) => {
                    let k = sent.count();
                    if k == 0 {
                        break;
                    }
                    at += k;
                }
                // The socket buffer is full: the rest is dropped, as a router would.
                Err(Errno::EAGAIN) => break,
                // One datagram the kernel refused (no route to the client, ...): skip it.
                Err(_) => at += 1,
            }
        }
        if j < n {
            if let Some(dst) = out.addr[j] {
                let _ = send_gso(listener, out.slot(j), out.seg[j], Some(dst), gso);
            }
            j += 1;
        }
        i = j;
    }
}

/// Sends a coalesced buffer as datagrams of `seg` bytes: one `UDP_SEGMENT` send where the kernel
/// takes it, one send per datagram where it does not (then GSO is not tried again here).
fn send_gso<F: AsFd>(
    fd: &F,
    data: &[u8],
    seg: usize,
    dst: Option<SocketAddr>,
    gso: &mut bool,
) -> io::Result<()> {
    let fd: BorrowedFd<'_> = fd.as_fd();
    let dst = dst.map(SockaddrStorage::from);
    if *gso && let Ok(size) = u16::try_from(seg) {
        let cmsg = [ControlMessage::UdpGsoSegments(&size)];
        match sendmsg(
            fd.as_raw_fd(),
            &[IoSlice::new(data)],
            &cmsg,
            MsgFlags::empty(),
            dst.as_ref(),
        ) {
            Ok(_) => return Ok(()),
            // No checksum offload on the way out, or no UDP_SEGMENT: split by hand from now on.
            Err(Errno::EIO | Errno::EINVAL | Errno::ENOPROTOOPT) => *gso = false,
            Err(e) => return Err(e.into()),
        }
    }
    for chunk in data.chunks(seg.max(1)) {
        sendmsg::<SockaddrStorage>(
            fd.as_raw_fd(),
            &[IoSlice::new(chunk)],
            &[],
            MsgFlags::empty(),
            dst.as_ref(),
        )?;
    }
    Ok(())
}

/// A flow's socket: an ephemeral port of the node, connected to the endpoint (so the kernel
/// delivers only that endpoint's replies to it).
fn connect(endpoint: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(
        Domain::for_address(endpoint),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    s.connect(&endpoint.into())?;
    super::socket::enable_gro(&s);
    Ok(s.into())
}
