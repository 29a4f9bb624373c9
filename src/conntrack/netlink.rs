//! [`ConntrackTable`] over ctnetlink (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`),
//! with `netlink-packet-netfilter` for the messages and `netlink-sys` for the socket.
//!
//! The socket is opened per call, in the network namespace of the calling thread (kproxy's own),
//! so only that namespace's table is ever read or changed. Deletions are batched: up to
//! [`BATCH`] `IPCTNL_MSG_CT_DELETE` requests in one datagram, each acknowledged separately and
//! matched by sequence number.
//!
//! Two attributes the crate does not model are hand-encoded as raw attributes: `CTA_ID` (so a
//! deletion never removes a newer entry that reuses the tuple) and `CTA_ZONE`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kproxy_contract::{IpFamily, Protocol};
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla as _,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as NlProtocol, Status,
    Tuple as NlTuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_NETFILTER};

use super::{ConntrackError, ConntrackTable, DeleteOutcome, Flow, Tuple};

/// Deletion requests per datagram.
pub const BATCH: usize = 256;
/// A kernel that does not answer within this is treated as an error, never a hang.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer: larger than any datagram a dump sends (the kernel sizes them to at most
/// 32 KiB, or the page size when larger).
const RECV_BUF: usize = 256 * 1024;

const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const ENOENT: i32 = 2;

/// The conntrack table of the caller's network namespace, over netlink.
#[derive(Debug, Default)]
pub struct NetlinkConntrack {
    sequence: u32,
}

impl NetlinkConntrack {
    /// A handle; sockets are opened per operation.
    pub fn new() -> Self {
        Self::default()
    }

    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1).max(1);
        self.sequence
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ConntrackError {
    move |source| ConntrackError::Io { what, source }
}

fn open() -> Result<Socket, ConntrackError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(io("socket"))?;
    socket.bind_auto().map_err(io("bind"))?;
    socket.connect(&NlAddr::new(0, 0)).map_err(io("connect"))?;
    let timeout = nix::sys::time::TimeVal::new(i64::try_from(TIMEOUT.as_secs()).unwrap_or(5), 0);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| ConntrackError::Io {
            what: "set the receive timeout",
            source: e.into(),
        })?;
    // Best effort: a larger buffer keeps a big dump or many acks from overrunning it.
    let _ = socket.set_rx_buf_sz(4 * 1024 * 1024);
    Ok(socket)
}

fn nl_family(family: IpFamily) -> NetfilterProtoFamily {
    match family {
        IpFamily::V4 => NetfilterProtoFamily::IPv4,
        IpFamily::V6 => NetfilterProtoFamily::IPv6,
    }
}

fn message(
    family: IpFamily,
    flags: u16,
    sequence: u32,
    body: ConntrackMessage,
) -> NetlinkMessage<NetfilterMessage> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(nl_family(family), 0, 0),
            body,
        )),
    );
    msg.finalize();
    msg
}

fn serialize_into(out: &mut Vec<u8>, msg: &NetlinkMessage<NetfilterMessage>) {
    let start = out.len();
    out.resize(start + msg.buffer_len(), 0);
    msg.serialize(&mut out[start..]);
}

/// Receives one datagram into `buf` (cleared first).
fn recv(socket: &Socket, buf: &mut Vec<u8>) -> Result<(), ConntrackError> {
    buf.clear();
    let n = socket.recv(buf, 0).map_err(io("receive"))?;
    if n > buf.len() {
        return Err(ConntrackError::Protocol(format!(
            "a {n}-byte datagram did not fit the {}-byte buffer",
            buf.len()
        )));
    }
    Ok(())
}

/// One netlink message of a datagram.
struct Received {
    /// The header's sequence number.
    seq: u32,
    /// For `NLMSG_ERROR` (an ack or a refusal), the errno (0 for an ack), read from the raw
    /// bytes so an ack is never lost to a decoding problem.
    ack: Option<i32>,
    /// The decoded message, when it decodes.
    parsed: Option<NetlinkMessage<NetfilterMessage>>,
}

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;

/// The netlink messages of one datagram.
fn messages(datagram: &[u8]) -> impl Iterator<Item = Received> + '_ {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        let rest = datagram.get(offset..)?;
        let header = rest.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let seq = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            offset = datagram.len();
            return None;
        }
        let ack = (kind == NLMSG_ERROR)
            .then(|| rest.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4))
            .flatten()
            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]));
        let parsed = NetlinkMessage::<NetfilterMessage>::deserialize(&rest[..len]).ok();
        offset += (len + 3) & !3;
        Some(Received { seq, ack, parsed })
    })
}

impl ConntrackTable for NetlinkConntrack {
    fn dump(&mut self, family: IpFamily) -> Result<Vec<Flow>, ConntrackError> {
        let socket = open()?;
        let seq = self.next_sequence();
        let request = message(
            family,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            ConntrackMessage::Get(vec![]),
        );
        let mut out = Vec::new();
        serialize_into(&mut out, &request);
        socket.send(&out, 0).map_err(io("send the dump request"))?;

        let mut flows = Vec::new();
        let mut undecodable = 0usize;
        let mut buf = Vec::with_capacity(RECV_BUF);
        loop {
            recv(&socket, &mut buf)?;
            for received in messages(&buf) {
                if received.seq != seq {
                    continue;
                }
                if let Some(code) = received.ack.filter(|c| *c != 0) {
                    return Err(ConntrackError::Io {
                        what: "dump",
                        source: std::io::Error::from_raw_os_error(code.abs()),
                    });
                }
                let Some(msg) = received.parsed else {
                    undecodable += 1;
                    continue;
                };
                match msg.payload {
                    NetlinkPayload::Done(_) => {
                        if undecodable > 0 {
                            tracing::debug!(undecodable, "conntrack dump: entries skipped");
                        }
                        return Ok(flows);
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(ConntrackError::Protocol("dump overrun".into()));
                    }
                    NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner:
                            NetfilterMessageInner::Conntrack(
                                ConntrackMessage::New(attrs) | ConntrackMessage::Get(attrs),
                            ),
                        ..
                    }) => {
                        if let Some(flow) = flow_of(&attrs) {
                            flows.push(flow);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn delete(&mut self, flows: &[Flow]) -> Result<DeleteOutcome, ConntrackError> {
        let mut outcome = DeleteOutcome::default();
        if flows.is_empty() {
            return Ok(outcome);
        }
        let socket = open()?;
        let mut buf = Vec::with_capacity(RECV_BUF);
        for chunk in flows.chunks(BATCH) {
            let mut out = Vec::new();
            let mut pending = std::collections::BTreeSet::new();
            for flow in chunk {
                let seq = self.next_sequence();
                pending.insert(seq);
                let request = message(
                    flow.family(),
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    ConntrackMessage::Delete(delete_attributes(flow)),
                );
                serialize_into(&mut out, &request);
            }
            socket.send(&out, 0).map_err(io("send deletions"))?;
            while !pending.is_empty() {
                recv(&socket, &mut buf)?;
                for received in messages(&buf) {
                    let Some(code) = received.ack else {
                        continue;
                    };
                    if !pending.remove(&received.seq) {
                        continue;
                    }
                    match code.abs() {
                        0 => outcome.deleted += 1,
                        ENOENT => outcome.missing += 1,
                        errno => {
                            outcome.failed += 1;
                            outcome.first_error.get_or_insert_with(|| {
                                std::io::Error::from_raw_os_error(errno).to_string()
                            });
                        }
                    }
                }
            }
        }
        Ok(outcome)
    }
}

/// The attributes that name one entry for `IPCTNL_MSG_CT_DELETE`.
fn delete_attributes(flow: &Flow) -> Vec<ConntrackAttribute> {
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(encode_tuple(
        flow.protocol,
        &flow.original,
    ))];
    if let Some(zone) = flow.zone {
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ZONE,
            zone.to_be_bytes().to_vec(),
        )));
    }
    if let Some(id) = flow.id {
        attrs.push(ConntrackAttribute::Other(DefaultNla::new(
            CTA_ID,
            id.to_be_bytes().to_vec(),
        )));
    }
    attrs
}

fn encode_tuple(protocol: Protocol, tuple: &Tuple) -> Vec<NlTuple> {
    vec![
        NlTuple::Ip(vec![
            IPTuple::SourceAddress(tuple.src.ip()),
            IPTuple::DestinationAddress(tuple.dst.ip()),
        ]),
        NlTuple::Proto(vec![
            ProtoTuple::Protocol(match protocol {
                Protocol::Tcp => NlProtocol::Tcp,
                Protocol::Udp => NlProtocol::Udp,
                Protocol::Sctp => NlProtocol::Sctp,
            }),
            ProtoTuple::SourcePort(tuple.src.port()),
            ProtoTuple::DestinationPort(tuple.dst.port()),
        ]),
    ]
}

/// A UDP or SCTP flow from a dumped entry's attributes; `None` for other protocols or an
/// incomplete entry.
pub(crate) fn flow_of(attrs: &[ConntrackAttribute]) -> Option<Flow> {
    let mut original = None;
    let mut reply = None;
    let mut status = Status::empty();
    let mut zone = None;
    let mut id = None;
    for attr in attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => original = decode_tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = decode_tuple(t),
            ConntrackAttribute::CtaStatus(s) => status = *s,
            ConntrackAttribute::Other(nla) => match (nla.kind(), raw_value(nla).as_slice()) {
                (CTA_ZONE, &[a, b]) => zone = Some(u16::from_be_bytes([a, b])).filter(|z| *z != 0),
                (CTA_ID, &[a, b, c, d]) => id = Some(u32::from_be_bytes([a, b, c, d])),
                _ => {}
            },
            _ => {}
        }
    }
    let (protocol, original) = original?;
    let (reply_protocol, reply) = reply?;
    if protocol != reply_protocol {
        return None;
    }
    Some(Flow {
        protocol,
        original,
        reply,
        dnat: status.contains(Status::DstNat),
        snat: status.contains(Status::SrcNat),
        zone,
        id,
    })
}

fn raw_value(nla: &DefaultNla) -> Vec<u8> {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    value
}

fn decode_tuple(tuple: &[NlTuple]) -> Option<(Protocol, Tuple)> {
    let (mut src, mut dst): (Option<IpAddr>, Option<IpAddr>) = (None, None);
    let (mut proto, mut sport, mut dport) = (None, None, None);
    for part in tuple {
        match part {
            NlTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            NlTuple::Proto(items) => {
                for item in items {
                    match item {
                        ProtoTuple::Protocol(p) => proto = Some(*p),
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let protocol = match proto? {
        NlProtocol::Udp => Protocol::Udp,
        NlProtocol::Sctp => Protocol::Sctp,
        _ => return None,
    };
    Some((
        protocol,
        Tuple {
            src: SocketAddr::new(src?, sport?),
            dst: SocketAddr::new(dst?, dport?),
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn udp_flow() -> Flow {
        Flow {
            protocol: Protocol::Udp,
            original: Tuple {
                src: "10.0.1.2:40000".parse().unwrap(),
                dst: "10.96.0.10:53".parse().unwrap(),
            },
            reply: Tuple {
                src: "10.244.1.10:5353".parse().unwrap(),
                dst: "10.0.1.2:40000".parse().unwrap(),
            },
            dnat: true,
            snat: false,
            zone: None,
            id: Some(0xdead_beef),
        }
    }

    /// What the kernel sends for an entry, as attributes: flow_of reads it back.
    #[test]
    fn decodes_a_dumped_udp_entry() {
        let f = udp_flow();
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(encode_tuple(f.protocol, &f.original)),
            ConntrackAttribute::CtaTupleReply(encode_tuple(f.protocol, &f.reply)),
            ConntrackAttribute::CtaStatus(Status::DstNat | Status::SeenReply),
            ConntrackAttribute::Other(DefaultNla::new(
                CTA_ID,
                0xdead_beef_u32.to_be_bytes().to_vec(),
            )),
        ];
        assert_eq!(flow_of(&attrs), Some(f));
    }

    #[test]
    fn skips_tcp_entries() {
        let f = udp_flow();
        let mut tuple = encode_tuple(Protocol::Tcp, &f.original);
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple.clone()),
            ConntrackAttribute::CtaTupleReply({
                tuple.truncate(2);
                tuple
            }),
        ];
        assert_eq!(flow_of(&attrs), None);
    }

    /// The delete request round-trips through the crate's own parser, with the raw attributes.
    #[test]
    fn delete_request_names_tuple_zone_and_id() {
        let mut f = udp_flow();
        f.zone = Some(7);
        let msg = message(
            IpFamily::V4,
            NLM_F_REQUEST | NLM_F_ACK,
            42,
            ConntrackMessage::Delete(delete_attributes(&f)),
        );
        let mut bytes = Vec::new();
        serialize_into(&mut bytes, &msg);
        let parsed: Vec<Received> = messages(&bytes).collect();
        assert_eq!(parsed.len(), 1);
        let Received {
            seq,
            ack,
            parsed: Some(back),
        } = parsed.into_iter().next().unwrap()
        else {
            panic!("not decodable")
        };
        assert_eq!((seq, ack), (42, None));
        assert_eq!(back.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        let NetlinkPayload::InnerMessage(NetfilterMessage {
            header,
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)),
            ..
        }) = back.payload
        else {
            panic!("not a conntrack delete: {:?}", back.payload)
        };
        assert_eq!(header.family, NetfilterProtoFamily::IPv4);
        assert_eq!(
            attrs[0],
            ConntrackAttribute::CtaTupleOrig(encode_tuple(Protocol::Udp, &f.original))
        );
        let raw: Vec<(u16, Vec<u8>)> = attrs[1..]
            .iter()
            .map(|a| match a {
                ConntrackAttribute::Other(n) => (n.kind(), raw_value(n)),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            raw,
            vec![
                (CTA_ZONE, vec![0, 7]),
                (CTA_ID, vec![0xde, 0xad, 0xbe, 0xef])
            ]
        );
    }

    /// Several messages in one datagram are split on their (aligned) lengths.
    #[test]
    fn splits_a_batch() {
        let f = udp_flow();
        let mut bytes = Vec::new();
        for seq in [1, 2, 3] {
            let msg = message(
                IpFamily::V4,
                NLM_F_REQUEST | NLM_F_ACK,
                seq,
                ConntrackMessage::Delete(delete_attributes(&f)),
            );
            serialize_into(&mut bytes, &msg);
        }
        let seqs: Vec<u32> = messages(&bytes)
            .map(|r| {
                assert!(r.parsed.is_some());
                r.seq
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    /// Acks and refusals are read from the raw bytes, by sequence number.
    #[test]
    fn reads_acks_and_refusals() {
        let mut bytes = Vec::new();
        for (seq, code) in [(5u32, 0i32), (6, -2), (7, -1)] {
            let mut err = netlink_packet_core::ErrorMessage::default();
            err.code = std::num::NonZeroI32::new(code);
            err.header = vec![0; 16];
            let mut header = NetlinkHeader::default();
            header.sequence_number = seq;
            let mut msg: NetlinkMessage<NetfilterMessage> =
                NetlinkMessage::new(header, NetlinkPayload::Error(err));
            msg.finalize();
            serialize_into(&mut bytes, &msg);
        }
        let acks: Vec<(u32, Option<i32>)> = messages(&bytes).map(|r| (r.seq, r.ack)).collect();
        assert_eq!(acks, vec![(5, Some(0)), (6, Some(-2)), (7, Some(-1))]);
    }
}
