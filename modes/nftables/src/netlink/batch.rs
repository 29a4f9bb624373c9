//! Building one nfnetlink batch: `NFNL_MSG_BATCH_BEGIN`, `NFT_MSG_DESTROYSETELEM` (or
//! `NFT_MSG_DELSETELEM`) / `NFT_MSG_NEWSETELEM` messages, `NFNL_MSG_BATCH_END`, kept in chunks
//! and sent gathered in one `sendmsg`: one datagram, which the kernel applies as one transaction.
//!
//! Deletions are idempotent where the kernel allows it ([`Deletes`]): two kproxies in one
//! network namespace (the old and the new pod of a rolling update with surge) apply the same
//! changes, and whichever comes second finds the elements the first deleted already gone.
//! `NFT_MSG_DELSETELEM` fails the whole transaction then (ENOENT), which had made every change
//! fail on one of them and forced a full resync each time.
//!
//! Many elements share one message (as nft does): the element list is a netlink attribute,
//! whose 16-bit length caps it at 64 KiB, so a message holds up to about a thousand
//! elements. Every message asks for an ACK; each element's offset inside its message is kept
//! so an error the kernel points at (extended ACK, `NLMSGERR_ATTR_OFFS`) names the element.

use kproxy_contract::IpFamily;

use super::types::{Data, EncodeError, SetType};
use crate::model::Text;

/// `NFNL_SUBSYS_NFTABLES`.
pub(super) const SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` / `NFNL_MSG_BATCH_END`.
pub(super) const MSG_BATCH_BEGIN: u16 = 0x10;
pub(super) const MSG_BATCH_END: u16 = 0x11;
/// `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM`.
const MSG_NEWSETELEM: u16 = 12;
const MSG_DELSETELEM: u16 = 14;
/// `NFT_MSG_DESTROYSETELEM` (Linux 6.3): like `DELSETELEM`, but an element that is not there
/// is skipped instead of failing the transaction.
pub(super) const MSG_DESTROYSETELEM: u16 = 30;

pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;

// enum nft_set_elem_list_attributes
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
// enum nft_list_attributes
const NFTA_LIST_ELEM: u16 = 1;
// enum nft_set_elem_attributes
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
// enum nft_data_attributes
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
// enum nft_verdict_attributes
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// `NFPROTO_IPV4` / `NFPROTO_IPV6`.
pub(super) fn nfproto(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => 2,
        IpFamily::V6 => 10,
    }
}

/// Largest element-list attribute (its length field is 16 bits), with room to spare.
const MAX_LIST: usize = 60_000;
/// Header sizes.
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// Add or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `NFT_MSG_DELSETELEM`.
    Delete,
    /// `NFT_MSG_NEWSETELEM`.
    Add,
}

impl Op {
    /// The verb, for messages.
    pub fn verb(self) -> &'static str {
        match self {
            Op::Delete => "delete",
            Op::Add => "add",
        }
    }
}

/// How a batch deletes elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletes {
    /// `NFT_MSG_DESTROYSETELEM` (Linux 6.3 and later): an element already gone is no error.
    Destroy,
    /// `NFT_MSG_DELSETELEM` (every kernel): an element already gone fails the transaction with
    /// ENOENT, naming it; [`crate::steps`] then sends the batch again without it.
    Delete,
}

/// One element as a plan holds it: its key and, in a map, its value.
pub type Element = (Text, Option<Text>);

/// One element of a batch, as the plan wrote it.
#[derive(Debug, Clone, Copy)]
pub struct ElementRef<'a> {
    /// Canonical key.
    pub key: &'a str,
    /// Canonical value (maps).
    pub value: Option<&'a str>,
}

/// What one message of the batch carries, to name what failed.
#[derive(Debug)]
pub struct MessageInfo<'a> {
    /// Its sequence number.
    pub seq: u32,
    /// The family of its table.
    pub family: IpFamily,
    /// The set or map.
    pub set: &'a str,
    /// Add or delete.
    pub op: Op,
    /// Its elements: this range of the batch's [`Batch::entries`] and [`Batch::offsets`].
    pub range: std::ops::Range<usize>,
}

impl<'a> From<&'a Element> for ElementRef<'a> {
    fn from((key, value): &'a Element) -> Self {
        ElementRef {
            key,
            value: value.as_deref(),
        }
    }
}

/// A batch's bytes are kept in chunks of about this size, each ending on a message boundary.
const CHUNK: usize = 1 << 20;

/// A whole batch: the bytes to send and what each message carries.
#[derive(Debug)]
pub struct Batch<'a> {
    /// The messages, back to back, in chunks of about [`CHUNK`] bytes that end on message
    /// boundaries; `bytes` is the chunk being filled. They go out as one datagram by
    /// scatter/gather (one `sendmsg`, so still one transaction) and are never copied into one
    /// buffer: a single buffer grown by doubling held up to twice the batch, and both the old
    /// and the new copy while it grew (a first sync at 50,000 services sends about 40 MiB).
    /// The first chunk grows from nothing (most batches are a few elements) up to a chunk's
    /// size; later ones are sized once.
    chunks: Vec<Vec<u8>>,
    bytes: Vec<u8>,
    /// The `BATCH_BEGIN` message's sequence number (commit errors come back under it).
    pub begin_seq: u32,
    /// The element messages, in order.
    pub messages: Vec<MessageInfo<'a>>,
    /// Every element, in order: the plan's own entries, borrowed (a pointer each, where a pair
    /// of borrowed strings was 32 bytes: 20 MiB at 50,000 services). One list for the whole
    /// batch, reserved per set, rather than one per message grown by doubling (11 MiB with
    /// the offsets at 50,000 services, 7 now).
    pub entries: Vec<&'a Element>,
    /// Each entry's offset from the start of its message, ascending within a message.
    pub offsets: Vec<u32>,
    /// Number of elements.
    pub elements: usize,
    /// How deletions are sent.
    pub deletes: Deletes,
    open: Option<Open>,
    next_seq: u32,
    scratch: Vec<u8>,
}

/// The message being filled.
#[derive(Debug)]
struct Open {
    start: usize,
    list: usize,
}

impl<'a> Batch<'a> {
    /// An empty batch whose sequence numbers start at `first_seq`, deleting with
    /// `NFT_MSG_DELSETELEM`.
    pub fn new(first_seq: u32) -> Self {
        Batch::with_deletes(first_seq, Deletes::Delete)
    }

    /// An empty batch whose sequence numbers start at `first_seq`, deleting as `deletes` says.
    pub fn with_deletes(first_seq: u32, deletes: Deletes) -> Self {
        let mut b = Batch {
            chunks: Vec::new(),
            bytes: Vec::new(),
            begin_seq: first_seq,
            messages: Vec::new(),
            entries: Vec::new(),
            offsets: Vec::new(),
            elements: 0,
            deletes,
            open: None,
            next_seq: first_seq,
            scratch: Vec::new(),
        };
        let seq = b.seq();
        header(
            &mut b.bytes,
            MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            SUBSYS_NFTABLES,
        );
        finish_message(&mut b.bytes, 0);
        b
    }

    /// The batch's bytes, chunk by chunk, in order.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.chunks
            .iter()
            .map(Vec::as_slice)
            .chain(std::iter::once(self.bytes.as_slice()))
    }

    /// The batch's size in bytes.
    pub fn len(&self) -> usize {
        self.chunks().map(<[u8]>::len).sum()
    }

    /// Whether the batch holds no bytes (never: it starts with `BATCH_BEGIN`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole batch in one buffer (tests and diagnostics; sending never copies it).
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks().flatten().copied().collect()
    }

    /// Starts a new chunk when the current one is full. Only between messages.
    fn rotate(&mut self) {
        // A message's length is patched in its own chunk: never rotate inside one.
        debug_assert!(self.open.is_none(), "rotate inside a message");
        const FULL: usize = CHUNK + MAX_LIST + 4096;
        if self.bytes.len() >= CHUNK {
            self.chunks
                .push(std::mem::replace(&mut self.bytes, Vec::with_capacity(FULL)));
        } else if self.bytes.capacity() - self.bytes.len() < MAX_LIST + 4096 {
            // The first chunk grows from nothing, by doubling, but never past a chunk's size
            // (doubling from 1 MiB gave the first chunk 2 MiB): room for the next message.
            let want = (self.bytes.capacity() * 2).clamp(MAX_LIST + 4096, FULL);
            self.bytes.reserve_exact(want - self.bytes.len());
        }
    }

    fn seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        s
    }

    /// The elements of message `m`, in order.
    pub fn elements_of(&self, m: &MessageInfo<'a>) -> &[&'a Element] {
        self.entries.get(m.range.clone()).unwrap_or_default()
    }

    /// The element of message `m` whose attribute starts at or before `offset` (an extended
    /// ACK's `NLMSGERR_ATTR_OFFS`), if the offset points into the element list.
    pub fn element_at(&self, m: &MessageInfo<'a>, offset: u32) -> Option<ElementRef<'a>> {
        let offsets = self.offsets.get(m.range.clone())?;
        let i = offsets.partition_point(|o| *o <= offset);
        i.checked_sub(1)
            .and_then(|i| self.elements_of(m).get(i))
            .map(|e| ElementRef::from(*e))
    }

    /// Makes room for `n` more elements (the next [`Batch::push_set`]'s).
    pub fn reserve(&mut self, n: usize) {
        self.entries.reserve_exact(n);
        self.offsets.reserve_exact(n);
    }

    /// Appends the changes of one set: `elements` with `op`, all of `ty`. After an error
    /// (an element that does not fit the type) the batch must not be sent.
    pub fn push_set(
        &mut self,
        family: IpFamily,
        table: &str,
        set: &'a str,
        ty: &SetType,
        op: Op,
        elements: impl IntoIterator<Item = &'a Element>,
    ) -> Result<(), EncodeError> {
        self.close();
        for e in elements {
            self.scratch.clear();
            encode_element(&mut self.scratch, ty, op, e.into())?;
            let fits = self
                .open
                .as_ref()
                .is_some_and(|o| self.bytes.len() - o.list + self.scratch.len() <= MAX_LIST);
            if !fits {
                self.close();
                self.open_message(family, table, set, op);
            }
            let start = self.open.as_ref().map_or(0, |o| o.start);
            let offset = u32::try_from(self.bytes.len() - start).unwrap_or(u32::MAX);
            self.bytes.extend_from_slice(&self.scratch);
            self.entries.push(e);
            self.offsets.push(offset);
            if let Some(m) = self.messages.last_mut() {
                m.range.end = self.entries.len();
            }
            self.elements += 1;
        }
        self.close();
        Ok(())
    }

    fn open_message(&mut self, family: IpFamily, table: &str, set: &'a str, op: Op) {
        self.rotate();
        let seq = self.seq();
        let start = self.bytes.len();
        let (kind, flags) = match (op, self.deletes) {
            (Op::Delete, Deletes::Delete) => (MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
            (Op::Delete, Deletes::Destroy) => (MSG_DESTROYSETELEM, NLM_F_REQUEST | NLM_F_ACK),
            (Op::Add, _) => (MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
        };
        header(
            &mut self.bytes,
            (SUBSYS_NFTABLES << 8) | kind,
            flags,
            seq,
            nfproto(family),
            0,
        );
        put_str(&mut self.bytes, NFTA_SET_ELEM_LIST_TABLE, table);
        put_str(&mut self.bytes, NFTA_SET_ELEM_LIST_SET, set);
        let list = begin_nest(&mut self.bytes, NFTA_SET_ELEM_LIST_ELEMENTS);
        self.open = Some(Open { start, list });
        self.messages.push(MessageInfo {
            seq,
            family,
            set,
            op,
            range: self.entries.len()..self.entries.len(),
        });
    }

    fn close(&mut self) {
        if let Some(o) = self.open.take() {
            end_nest(&mut self.bytes, o.list);
            finish_message(&mut self.bytes, o.start);
        }
    }

    /// Appends `BATCH_END`; the batch is complete.
    pub fn finish(mut self) -> Self {
        self.close();
        self.rotate();
        let seq = self.seq();
        let start = self.bytes.len();
        header(
            &mut self.bytes,
            MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            SUBSYS_NFTABLES,
        );
        finish_message(&mut self.bytes, start);
        self
    }
}

/// One `NFTA_LIST_ELEM`.
fn encode_element(
    out: &mut Vec<u8>,
    ty: &SetType,
    op: Op,
    e: ElementRef<'_>,
) -> Result<(), EncodeError> {
    let key = ty.encode_key(e.key)?;
    // A deletion is by key: the kernel ignores data, so none is sent.
    let data = match op {
        Op::Add => ty.encode_data(e.value)?,
        Op::Delete => None,
    };
    let elem = begin_nest(out, NFTA_LIST_ELEM);
    let k = begin_nest(out, NFTA_SET_ELEM_KEY);
    put(out, NFTA_DATA_VALUE, &key);
    end_nest(out, k);
    if let Some(data) = data {
        let d = begin_nest(out, NFTA_SET_ELEM_DATA);
        match data {
            Data::Value(v) => put(out, NFTA_DATA_VALUE, &v),
            Data::Verdict(code, chain) => {
                let v = begin_nest(out, NFTA_DATA_VERDICT);
                put(out, NFTA_VERDICT_CODE, &code.to_be_bytes());
                if let Some(chain) = chain {
                    put_str(out, NFTA_VERDICT_CHAIN, chain);
                }
                end_nest(out, v);
            }
        }
        end_nest(out, d);
    }
    end_nest(out, elem);
    Ok(())
}

/// `nlmsghdr` (length patched by [`finish_message`]) and `nfgenmsg`.
pub(super) fn header(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
}

pub(super) fn finish_message(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn put(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

pub(super) fn put_str(out: &mut Vec<u8>, kind: u16, s: &str) {
    let len = u16::try_from(4 + s.len() + 1).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn begin_nest(out: &mut Vec<u8>, kind: u16) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    start
}

fn end_nest(out: &mut [u8], start: usize) {
    let len = u16::try_from(out.len() - start).unwrap_or(u16::MAX);
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// Size of the fixed headers of a message (for tests and buffer sizing).
pub const MESSAGE_OVERHEAD: usize = NLMSG_HDRLEN + NFGENMSG_LEN;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn el(key: &str, value: Option<&str>) -> Element {
        (key.into(), value.map(Text::from))
    }

    /// `nft --debug=mnl add element ip kproxy service-ips { 10.96.0.10 . tcp . 80 : goto
    /// pick-3 }` (nft 1.0.6) sent this NEWSETELEM (112 bytes; its NFTA_SET_ELEM_LIST_SET_ID
    /// attribute, which only matters for a set created in the same batch, is left out here).
    #[test]
    fn newsetelem_matches_the_message_nft_sends() {
        let ty = SetType::parse("ipv4_addr . inet_proto . inet_service : verdict").unwrap();
        let elements = [el("10.96.0.10 . tcp . 80", Some("goto pick-3"))];
        let mut b = Batch::new(7);
        b.push_set(
            IpFamily::V4,
            "kproxy",
            "service-ips",
            &ty,
            Op::Add,
            &elements,
        )
        .unwrap();
        let b = b.finish();
        // BATCH_BEGIN: 20 bytes, type 16, res_id 10 (big-endian).
        let mut begin = Vec::new();
        begin.extend_from_slice(&20u32.to_ne_bytes());
        begin.extend_from_slice(&16u16.to_ne_bytes());
        begin.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        begin.extend_from_slice(&7u32.to_ne_bytes());
        begin.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 10]);
        let bytes = b.to_vec();
        assert_eq!(&bytes[..20], &begin[..]);

        let msg = &bytes[20..];
        let len = u32::from_ne_bytes(msg[..4].try_into().unwrap()) as usize;
        assert_eq!(
            len,
            112 - 8,
            "nft's 112 bytes less the 8-byte SET_ID attribute"
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), (10 << 8) | 12);
        // The attributes, as nft's dump shows them (lengths/types in host order).
        let mut want: Vec<u8> = vec![2, 0, 0, 0];
        let attr = |w: &mut Vec<u8>, len: u16, ty: u16| {
            w.extend_from_slice(&len.to_ne_bytes());
            w.extend_from_slice(&ty.to_ne_bytes());
        };
        attr(&mut want, 11, 1);
        want.extend_from_slice(b"kproxy\0\0");
        attr(&mut want, 16, 2);
        want.extend_from_slice(b"service-ips\0");
        attr(&mut want, 56, 0x8003);
        attr(&mut want, 52, 0x8001);
        attr(&mut want, 20, 0x8001);
        attr(&mut want, 16, 1);
        want.extend_from_slice(&[0x0a, 0x60, 0x00, 0x0a, 6, 0, 0, 0, 0x00, 0x50, 0, 0]);
        attr(&mut want, 28, 0x8002);
        attr(&mut want, 24, 0x8002);
        attr(&mut want, 8, 1);
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xfc]);
        attr(&mut want, 11, 2);
        want.extend_from_slice(b"pick-3\0\0");
        assert_eq!(&msg[16..len], &want[..]);

        // BATCH_END, then nothing.
        let end = &bytes[20 + len..];
        assert_eq!(end.len(), 20);
        assert_eq!(u16::from_ne_bytes([end[4], end[5]]), 17);
        assert_eq!(b.messages.len(), 1);
        assert_eq!(b.messages[0].seq, 8);
    }

    /// A destroy is a delete with another message type (the attributes are the same):
    /// `NFT_MSG_DESTROYSETELEM` is 30 in the uapi's `enum nf_tables_msg_types` (after
    /// `NFT_MSG_GETRULE_RESET` = 25 and the destroys of tables, chains, rules and sets).
    #[test]
    fn a_destroy_differs_from_a_delete_only_in_its_type() {
        let ty = SetType::parse("ipv4_addr . inet_proto . inet_service : verdict").unwrap();
        let elements = [el("10.96.0.10 . tcp . 80", Some("goto pick-3"))];
        let batch = |deletes| {
            let mut b = Batch::with_deletes(7, deletes);
            b.push_set(
                IpFamily::V4,
                "kproxy",
                "service-ips",
                &ty,
                Op::Delete,
                &elements,
            )
            .unwrap();
            b.finish().to_vec()
        };
        let (del, destroy) = (batch(Deletes::Delete), batch(Deletes::Destroy));
        assert_eq!(del.len(), destroy.len());
        let kind = |b: &[u8]| u16::from_ne_bytes([b[20 + 4], b[20 + 5]]);
        assert_eq!(kind(&del), (10 << 8) | 14);
        assert_eq!(kind(&destroy), (10 << 8) | 30);
        let flags = |b: &[u8]| u16::from_ne_bytes([b[20 + 6], b[20 + 7]]);
        assert_eq!(flags(&del), flags(&destroy));
        let (mut a, mut b) = (del.clone(), destroy.clone());
        a[24..26].fill(0);
        b[24..26].fill(0);
        assert_eq!(a, b, "only the message type differs");
        // A deletion carries the key only: the kernel deletes by key.
        assert!(!destroy.windows(7).any(|w| w == b"pick-3\0"));
        assert_eq!(Batch::new(1).deletes, Deletes::Delete);
    }

    #[test]
    fn large_changes_split_into_messages_under_the_attribute_limit() {
        let ty = SetType::parse(
            "ipv4_addr . inet_proto . inet_service . integer : ipv4_addr . inet_service",
        )
        .unwrap();
        let keys: Vec<Element> = (0..5_000u32)
            .map(|i| {
                el(
                    &format!("10.96.{}.{} . tcp . 80 . 0", i / 250, i % 250),
                    Some(&format!("10.244.{}.{} . 8080", i / 250, i % 250)),
                )
            })
            .collect();
        let mut b = Batch::new(1);
        b.push_set(IpFamily::V4, "kproxy", "endpoints-tcp", &ty, Op::Add, &keys)
            .unwrap();
        let b = b.finish();
        assert!(b.messages.len() > 1);
        assert_eq!(b.elements, 5_000);
        assert_eq!(
            b.messages.iter().map(|m| m.range.len()).sum::<usize>(),
            5_000
        );
        // Walk the messages: lengths add up and every element list fits in 16 bits.
        let bytes = b.to_vec();
        let mut off = 0;
        let mut n = 0;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            assert!((MESSAGE_OVERHEAD..65_536 + 64).contains(&len));
            off += len;
            n += 1;
        }
        assert_eq!(off, bytes.len());
        assert_eq!(n, b.messages.len() + 2);
        // Offsets name elements.
        let m = &b.messages[1];
        let (o, e) = (b.offsets[m.range.start + 3], b.elements_of(m)[3]);
        assert_eq!(b.element_at(m, o + 5).unwrap().key, &*e.0);
        assert!(b.element_at(m, 0).is_none());
    }

    #[test]
    fn an_element_that_cannot_be_encoded_is_an_error() {
        let ty = SetType::parse("ipv4_addr").unwrap();
        let mut b = Batch::new(1);
        let elements = [el("10.0.0.1", None), el("fd00::1", None)];
        let err = b
            .push_set(
                IpFamily::V4,
                "kproxy",
                "cluster-ips",
                &ty,
                Op::Add,
                &elements,
            )
            .unwrap_err();
        assert!(err.to_string().contains("fd00::1"), "{err}");
    }
}
