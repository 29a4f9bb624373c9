//! Sending a [`Batch`] and reading its ACKs.
//!
//! The batch goes out in one `sendmsg`, gathered from its chunks (nfnetlink processes one
//! datagram as one transaction, synchronously, so every reply is queued before `sendmsg`
//! returns). The send buffer
//! is forced to the batch's size and the receive buffer to room for every ACK, which is what
//! keeps large batches from failing with ENOBUFS (docs/semantics.md, implementation note 1).
//! `NETLINK_CAP_ACK`
//! keeps error replies small (the kernel does not echo a 60 KiB message back) and
//! `NETLINK_EXT_ACK` makes the kernel say which attribute, hence which element, it refused.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use kproxy_contract::IpFamily;
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};

use super::batch::{Batch, Deletes, Element, ElementRef, MessageInfo, Op};
use super::{MissingElement, NetlinkError};
use crate::model::family_name;

/// A kernel that has not answered within this is an error, never a hang.
const TIMEOUT: Duration = Duration::from_secs(10);

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
/// The error message carries extended-ACK attributes.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// The error message does not echo the request's payload.
const NLM_F_CAPPED: u16 = 0x100;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
const EPERM: i32 = 1;
const ENOENT: i32 = 2;

/// What [`NftSocket::deletes`] found on this kernel: 0 not asked yet, else [`DESTROY`] or
/// [`DELETE`]. The kernel does not change under a running process.
static DELETES: AtomicU8 = AtomicU8::new(0);
const DESTROY: u8 = 1;
const DELETE: u8 = 2;
/// The table the destroy probe names; it must not exist (ENOENT is the answer wanted).
const PROBE_TABLE: &str = "kproxy-destroy-probe.invalid";

fn unavailable(what: &'static str) -> impl FnOnce(io::Error) -> NetlinkError {
    move |source| NetlinkError::Unavailable { what, source }
}

thread_local! {
    /// The socket of the last successful batch on this thread, with its network namespace's
    /// inode. Reused because closing an nf_tables socket right after a commit waits for the
    /// transaction's deferred cleanup (an RCU grace period, measured at 5-15 ms here): the
    /// kernel flushes it on NETLINK_URELEASE. `nft` pays that on every exit.
    static CACHED: RefCell<Option<(u64, NftSocket)>> = const { RefCell::new(None) };
}

/// The calling thread's network namespace (the inode of `/proc/thread-self/ns/net`).
fn netns_id() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// This thread's cached socket if it belongs to the thread's current network namespace, or
/// a new one. Give it back with [`release`] after a successful batch.
pub fn acquire() -> Result<NftSocket, NetlinkError> {
    let ns = netns_id();
    let cached = CACHED.with_borrow_mut(Option::take);
    match cached {
        Some((id, socket)) if Some(id) == ns => Ok(socket),
        _ => NftSocket::open(),
    }
}

/// Keeps a socket whose every reply was read for the next batch on this thread.
pub fn release(socket: NftSocket) {
    if let Some(ns) = netns_id() {
        CACHED.with_borrow_mut(|c| *c = Some((ns, socket)));
    }
}

/// An nf_tables socket in the calling thread's network namespace.
#[derive(Debug)]
pub struct NftSocket {
    socket: Socket,
}

impl NftSocket {
    /// Opens and binds a `NETLINK_NETFILTER` socket.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(unavailable("socket"))?;
        socket.bind_auto().map_err(unavailable("bind"))?;
        socket
            .connect(&NlAddr::new(0, 0))
            .map_err(unavailable("connect"))?;
        // Best effort: without them errors are still reported, only less precisely.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        let timeout =
            nix::sys::time::TimeVal::new(i64::try_from(TIMEOUT.as_secs()).unwrap_or(10), 0);
        setsockopt(&socket, sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| unavailable("set the receive timeout")(e.into()))?;
        Ok(Self { socket })
    }

    /// Sends the batch and waits for every message's ACK: `Ok` once the kernel has committed
    /// the transaction.
    pub fn apply(&self, batch: &Batch<'_>) -> Result<(), NetlinkError> {
        self.size_buffers(batch)?;
        // One datagram gathered from the batch's chunks: the kernel copies them into one
        // message, so this is the same transaction as a send of one buffer.
        let slices: Vec<std::io::IoSlice<'_>> = batch.chunks().map(std::io::IoSlice::new).collect();
        let sent = nix::sys::socket::sendmsg::<nix::sys::socket::NetlinkAddr>(
            self.socket.as_raw_fd(),
            &slices,
            &[],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(|e| unavailable("send the batch")(e.into()))?;
        if sent != batch.len() {
            return Err(NetlinkError::Protocol(format!(
                "sent {sent} of {} bytes",
                batch.len()
            )));
        }
        self.read_acks(batch)
    }

    /// How this kernel can delete elements: [`Deletes::Destroy`] where it knows
    /// `NFT_MSG_DESTROYSETELEM` (Linux 6.3 and later), else [`Deletes::Delete`]. Asked once
    /// per process (see [`NftSocket::knows_destroy`]); a probe that gets no clear answer is
    /// not remembered, and [`Deletes::Delete`] is used meanwhile, which works everywhere.
    pub fn deletes(&self) -> Deletes {
        match DELETES.load(Ordering::Relaxed) {
            DESTROY => return Deletes::Destroy,
            DELETE => return Deletes::Delete,
            _ => {}
        }
        match self.knows_destroy() {
            Ok(true) => {
                DELETES.store(DESTROY, Ordering::Relaxed);
                Deletes::Destroy
            }
            Ok(false) => {
                tracing::info!(
                    "this kernel has no NFT_MSG_DESTROYSETELEM (before 6.3): element deletions \
                     that find nothing are sent again without those elements"
                );
                DELETES.store(DELETE, Ordering::Relaxed);
                Deletes::Delete
            }
            Err(err) => {
                tracing::debug!(error = %kproxy_contract::Chain(&err), "cannot probe for NFT_MSG_DESTROYSETELEM");
                Deletes::Delete
            }
        }
    }

    /// Whether the kernel knows `NFT_MSG_DESTROYSETELEM`: a batch holding one, for a table
    /// that does not exist. A kernel that knows the message looks the table up and answers
    /// ENOENT; one that does not refuses the message type (EINVAL, or EOPNOTSUPP). Either way
    /// the transaction fails, so nothing changes.
    pub fn knows_destroy(&self) -> Result<bool, NetlinkError> {
        use super::batch::{
            MSG_BATCH_BEGIN, MSG_BATCH_END, MSG_DESTROYSETELEM, NLM_F_ACK, NLM_F_REQUEST,
            SUBSYS_NFTABLES, finish_message, header, nfproto, put_str,
        };
        const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
        const NFTA_SET_ELEM_LIST_SET: u16 = 2;
        static NEXT: AtomicU32 = AtomicU32::new(0x6000_0000);
        let begin = NEXT.fetch_add(3, Ordering::Relaxed);
        let (seq, end) = (begin.wrapping_add(1), begin.wrapping_add(2));
        let mut msg = Vec::with_capacity(128);
        header(
            &mut msg,
            MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            0,
            SUBSYS_NFTABLES,
        );
        finish_message(&mut msg, 0);
        let start = msg.len();
        header(
            &mut msg,
            (SUBSYS_NFTABLES << 8) | MSG_DESTROYSETELEM,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            nfproto(IpFamily::V4),
            0,
        );
        put_str(&mut msg, NFTA_SET_ELEM_LIST_TABLE, PROBE_TABLE);
        put_str(&mut msg, NFTA_SET_ELEM_LIST_SET, "probe");
        finish_message(&mut msg, start);
        let start = msg.len();
        header(
            &mut msg,
            MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            SUBSYS_NFTABLES,
        );
        finish_message(&mut msg, start);
        self.socket
            .send(&msg, 0)
            .map_err(unavailable("send the destroy probe"))?;
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        loop {
            buf.clear();
            self.socket.recv(&mut buf, 0).map_err(|e| {
                NetlinkError::Protocol(format!("reading the reply to the destroy probe: {e}"))
            })?;
            for reply in replies(&buf).filter(|r| r.seq == seq || r.seq == begin) {
                match reply.error {
                    None | Some(0) => {}
                    Some(e) if -e == ENOENT && reply.seq == seq => return Ok(true),
                    Some(e) if reply.seq == seq => {
                        tracing::debug!(errno = -e, "the destroy probe was refused");
                        return Ok(false);
                    }
                    Some(e) => return Err(rejected(e, None, None, reply.message)),
                }
            }
        }
    }

    /// Whether `family`'s table `name` exists: one `NFT_MSG_GETTABLE` for that table alone.
    /// (`nft list tables` fetches every set's elements first: seconds at 130,000 elements.)
    pub fn table_exists(&self, family: IpFamily, name: &str) -> Result<bool, NetlinkError> {
        use super::batch::{
            NLM_F_ACK, NLM_F_REQUEST, SUBSYS_NFTABLES, finish_message, header, nfproto, put_str,
        };
        const MSG_GETTABLE: u16 = 1;
        const NFTA_TABLE_NAME: u16 = 1;
        static NEXT: AtomicU32 = AtomicU32::new(0x4000_0000);
        let seq = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut msg = Vec::with_capacity(64);
        header(
            &mut msg,
            (SUBSYS_NFTABLES << 8) | MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            nfproto(family),
            0,
        );
        put_str(&mut msg, NFTA_TABLE_NAME, name);
        finish_message(&mut msg, 0);
        self.socket
            .send(&msg, 0)
            .map_err(unavailable("send a table query"))?;
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        loop {
            buf.clear();
            self.socket.recv(&mut buf, 0).map_err(|e| {
                NetlinkError::Protocol(format!("reading the reply to a table query: {e}"))
            })?;
            // The table's description (if it exists), then the ACK or the error.
            for reply in replies(&buf).filter(|r| r.seq == seq) {
                match reply.error {
                    None => {}
                    Some(0) => return Ok(true),
                    Some(e) if -e == ENOENT => return Ok(false),
                    Some(e) => return Err(rejected(e, None, None, reply.message)),
                }
            }
        }
    }

    fn size_buffers(&self, batch: &Batch<'_>) -> Result<(), NetlinkError> {
        let snd = batch.len() + 64 * 1024;
        // An ACK is 36 bytes, an error with extended ACK under 200; skb overhead is counted too.
        let rcv = batch.messages.len() * 1024 + 1024 * 1024;
        if setsockopt(&self.socket, sockopt::SndBufForce, &snd).is_err() {
            setsockopt(&self.socket, sockopt::SndBuf, &snd)
                .map_err(|e| unavailable("size the send buffer")(e.into()))?;
        }
        if setsockopt(&self.socket, sockopt::RcvBufForce, &rcv).is_err() {
            setsockopt(&self.socket, sockopt::RcvBuf, &rcv)
                .map_err(|e| unavailable("size the receive buffer")(e.into()))?;
        }
        Ok(())
    }

    fn read_acks(&self, batch: &Batch<'_>) -> Result<(), NetlinkError> {
        let first = batch.messages.first().map_or(0, |m| m.seq);
        let mut answered = vec![false; batch.messages.len()];
        let mut remaining = batch.messages.len();
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        while remaining > 0 {
            buf.clear();
            let n = self.socket.recv(&mut buf, 0).map_err(|e| {
                NetlinkError::Protocol(format!(
                    "reading the ACKs ({remaining} of {} outstanding): {e}",
                    batch.messages.len()
                ))
            })?;
            if n > buf.len() {
                return Err(NetlinkError::Protocol(format!(
                    "a {n}-byte reply did not fit the buffer"
                )));
            }
            for reply in replies(&buf) {
                let Some(code) = reply.error else { continue };
                if reply.seq == batch.begin_seq {
                    // nfnetlink refused the batch itself (permission), or the commit failed.
                    return Err(rejected(code, None, None, reply.message));
                }
                let i = reply.seq.wrapping_sub(first) as usize;
                if i >= answered.len() {
                    // Not this batch's.
                    continue;
                }
                if code != 0 {
                    let info = &batch.messages[i];
                    let element = reply.offset.and_then(|o| batch.element_at(info, o));
                    let sent = (info, batch.elements_of(info));
                    return Err(rejected(code, Some(sent), element, reply.message));
                }
                if !answered[i] {
                    answered[i] = true;
                    remaining -= 1;
                }
            }
        }
        Ok(())
    }
}

fn rejected(
    code: i32,
    sent: Option<(&MessageInfo<'_>, &[&Element])>,
    element: Option<ElementRef<'_>>,
    message: Option<String>,
) -> NetlinkError {
    let errno = code.saturating_abs();
    let info = sent.map(|(m, _)| m);
    let what = match (sent, element) {
        (Some((m, _)), Some(e)) => format!(
            "{} element `{}` {} {} set {}",
            m.op.verb(),
            match e.value {
                Some(v) => format!("{} : {v}", e.key),
                None => e.key.to_string(),
            },
            if m.op.verb() == "add" { "to" } else { "from" },
            family_name(m.family),
            m.set
        ),
        (Some((m, elements)), None) => format!(
            "{} one of {} elements (first `{}`) {} {} set {}",
            m.op.verb(),
            elements.len(),
            elements.first().map_or("", |(key, _)| &**key),
            if m.op.verb() == "add" { "to" } else { "from" },
            family_name(m.family),
            m.set
        ),
        (None, _) => "apply the batch".to_string(),
    };
    let missing = match (info, element) {
        (Some(m), Some(e)) if errno == ENOENT && m.op == Op::Delete => Some(MissingElement {
            family: m.family,
            set: m.set.to_string(),
            key: e.key.to_string(),
        }),
        _ => None,
    };
    let source = io::Error::from_raw_os_error(errno);
    if errno == EPERM {
        return NetlinkError::Unavailable {
            what: "nf_tables refused the batch",
            source,
        };
    }
    NetlinkError::Rejected {
        what,
        errno,
        source,
        detail: message.map(|m| format!(" ({m})")).unwrap_or_default(),
        missing,
    }
}

/// One reply message.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    seq: u32,
    /// For `NLMSG_ERROR`: 0 (an ACK) or a negative errno.
    error: Option<i32>,
    /// Extended ACK: the offending attribute's offset in the request.
    offset: Option<u32>,
    /// Extended ACK: the kernel's message.
    message: Option<String>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The messages of one datagram; malformed bytes end the walk, never panic.
fn replies(datagram: &[u8]) -> impl Iterator<Item = Reply> + '_ {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        let rest = datagram.get(offset..)?;
        let len = u32_at(rest, 0)? as usize;
        let kind = u16_at(rest, 4)?;
        let flags = u16_at(rest, 6)?;
        let seq = u32_at(rest, 8)?;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        offset += len.next_multiple_of(4);
        let msg = &rest[..len];
        let mut reply = Reply {
            seq,
            error: None,
            offset: None,
            message: None,
        };
        if kind == NLMSG_ERROR {
            reply.error = u32_at(msg, NLMSG_HDRLEN).map(|e| e as i32);
            if flags & NLM_F_ACK_TLVS != 0 {
                // nlmsgerr: error, then the request's header (and payload unless capped).
                let orig = NLMSG_HDRLEN + 4;
                let orig_len = if flags & NLM_F_CAPPED != 0 {
                    NLMSG_HDRLEN
                } else {
                    u32_at(msg, orig).map_or(NLMSG_HDRLEN, |l| l as usize)
                };
                let mut at = (orig + orig_len).next_multiple_of(4);
                while let (Some(alen), Some(aty)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
                    let alen = alen as usize;
                    if alen < 4 || at + alen > msg.len() {
                        break;
                    }
                    let body = &msg[at + 4..at + alen];
                    match aty & 0x3fff {
                        NLMSGERR_ATTR_MSG => {
                            let text = body.split(|b| *b == 0).next().unwrap_or_default();
                            reply.message = Some(String::from_utf8_lossy(text).into_owned());
                        }
                        NLMSGERR_ATTR_OFFS => reply.offset = u32_at(body, 0),
                        _ => {}
                    }
                    at += alen.next_multiple_of(4);
                }
            }
        }
        Some(reply)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_reply(seq: u32, errno: i32, tlvs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        let flags = if tlvs.is_empty() {
            0
        } else {
            NLM_F_ACK_TLVS | NLM_F_CAPPED
        };
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(-errno).to_ne_bytes());
        // The request's header.
        m.extend_from_slice(&[0u8; 16]);
        for (ty, body) in tlvs {
            let len = u16::try_from(4 + body.len()).unwrap_or_default();
            m.extend_from_slice(&len.to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(body);
            m.resize(m.len().next_multiple_of(4), 0);
        }
        let len = u32::try_from(m.len()).unwrap_or_default();
        m[..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    #[test]
    fn acks_errors_and_extended_ack_attributes_are_read() {
        let mut d = error_reply(5, 0, &[]);
        d.extend(error_reply(
            6,
            2,
            &[
                (NLMSGERR_ATTR_OFFS, &84u32.to_ne_bytes()),
                (NLMSGERR_ATTR_MSG, b"nope\0"),
            ],
        ));
        let r: Vec<Reply> = replies(&d).collect();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].error, Some(0));
        assert_eq!(r[1].error, Some(-2));
        assert_eq!(r[1].offset, Some(84));
        assert_eq!(r[1].message.as_deref(), Some("nope"));
    }

    #[test]
    fn malformed_replies_end_the_walk_without_panicking() {
        let good = error_reply(1, 0, &[]);
        for cut in 0..good.len() {
            let _ = replies(&good[..cut]).count();
        }
        let mut bad = good.clone();
        bad[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(replies(&bad).count(), 0);
        let mut huge = good;
        huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(replies(&huge).count(), 0);
    }
}
