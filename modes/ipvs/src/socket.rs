//! The generic-netlink socket to the kernel's IPVS: family resolution, dumps, and batched
//! requests (many messages per datagram, one ack each, so 10,000 changes are a few hundred
//! system calls rather than 10,000 round trips).

use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

use crate::genl::{self, IpvsMessage};
use crate::model::{DestCounters, IpvsTimeouts, RsKey, VsKey};

/// Requests per datagram.
const BATCH: usize = 128;
/// A kernel that does not answer within this is an error, never a hang.
const TIMEOUT: Duration = Duration::from_secs(10);
const RECV_BUF: usize = 256 * 1024;
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// errno values the mode reacts to.
pub const ENOENT: i32 = 2;
/// errno: the object exists already.
pub const EEXIST: i32 = 17;
/// errno of a dest or service that does not exist (`ip_vs_genl_set_cmd` answers ESRCH for an
/// unknown service).
pub const ESRCH: i32 = 3;

/// What went wrong talking to IPVS.
#[derive(Debug, thiserror::Error)]
pub enum GenlError {
    /// The kernel has no IPVS family: `CONFIG_IP_VS` is off or `ip_vs` is not loaded.
    #[error(
        "this kernel has no IPVS (CONFIG_IP_VS); use --proxy-mode nftables or iptables (or load the ip_vs module)"
    )]
    NoIpvs,
    /// A socket operation failed.
    #[error("IPVS netlink {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a request.
    #[error("IPVS refused {request}: {}", std::io::Error::from_raw_os_error(*.errno))]
    Refused {
        /// The request, ipvsadm-style.
        request: String,
        /// The positive errno.
        errno: i32,
    },
    /// The kernel's answer could not be understood.
    #[error("IPVS netlink: {0}")]
    Protocol(String),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> GenlError {
    move |source| GenlError::Io { what, source }
}

/// An open IPVS socket with its resolved family id.
#[derive(Debug)]
pub struct IpvsSocket {
    socket: Socket,
    family: u16,
    seq: u32,
    buf: Vec<u8>,
}

/// One request of a batch: the message and how to name it in an error.
#[derive(Debug)]
pub struct Request {
    /// The message.
    pub msg: IpvsMessage,
    /// ipvsadm-style description.
    pub what: String,
    /// errnos that count as success (for example ENOENT when deleting).
    pub tolerate: &'static [i32],
}

impl IpvsSocket {
    /// Opens a socket and resolves the IPVS family. [`GenlError::NoIpvs`] when the kernel has
    /// none.
    pub fn open() -> Result<IpvsSocket, GenlError> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(io("socket"))?;
        socket.bind_auto().map_err(io("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(io("connect"))?;
        let secs = i64::try_from(TIMEOUT.as_secs()).unwrap_or(10);
        let timeout = nix::sys::time::TimeVal::new(secs, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| GenlError::Io {
                what: "set the receive timeout",
                source: e.into(),
            })?;
        let _ = socket.set_rx_buf_sz(4 * 1024 * 1024);
        let mut s = IpvsSocket {
            socket,
            family: 0,
            seq: 0,
            buf: vec![0u8; RECV_BUF],
        };
        s.family = s.resolve()?;
        Ok(s)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    fn resolve(&mut self) -> Result<u16, GenlError> {
        let mut g = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(genl::FAMILY.to_owned())],
        });
        g.finalize();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.next_seq();
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(g));
        nl.finalize();
        let mut out = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut out);
        self.socket.send(&out, 0).map_err(io("send GETFAMILY"))?;
        self.recv()?;
        let datagram = self.buf.clone();
        for (kind, _seq, body) in frames(&datagram) {
            if kind == NLMSG_ERROR {
                let errno = error_code(body);
                if errno == ENOENT {
                    return Err(GenlError::NoIpvs);
                }
                return Err(GenlError::Refused {
                    request: "GETFAMILY IPVS".into(),
                    errno,
                });
            }
            if let Ok(msg) = NetlinkMessage::<GenlMessage<GenlCtrl>>::deserialize(body)
                && let NetlinkPayload::InnerMessage(g) = msg.payload
                && let Some(id) = g.payload.nlas.iter().find_map(|a| match a {
                    GenlCtrlAttrs::FamilyId(id) => Some(*id),
                    _ => None,
                })
            {
                return Ok(id);
            }
        }
        Err(GenlError::Protocol(
            "no family id in the GETFAMILY answer".into(),
        ))
    }

    fn recv(&mut self) -> Result<(), GenlError> {
        self.buf.clear();
        self.buf.reserve(RECV_BUF);
        let n = self.socket.recv(&mut self.buf, 0).map_err(io("receive"))?;
        if n > self.buf.len() {
            return Err(GenlError::Protocol(format!(
                "a {n}-byte datagram did not fit the receive buffer"
            )));
        }
        Ok(())
    }

    fn encode(&mut self, msg: IpvsMessage, flags: u16, out: &mut Vec<u8>) -> u32 {
        let seq = self.next_seq();
        let mut g = GenlMessage::from_payload(msg);
        g.set_resolved_family_id(self.family);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(g));
        nl.finalize();
        let start = out.len();
        out.resize(start + nl.buffer_len(), 0);
        nl.serialize(&mut out[start..]);
        seq
    }

    /// Runs a dump request and returns the decoded replies.
    fn dump(&mut self, msg: IpvsMessage, what: &str) -> Result<Vec<IpvsMessage>, GenlError> {
        let mut out = Vec::new();
        let seq = self.encode(msg, NLM_F_REQUEST | NLM_F_DUMP, &mut out);
        self.socket
            .send(&out, 0)
            .map_err(io("send a dump request"))?;
        let mut replies = Vec::new();
        loop {
            self.recv()?;
            let datagram = std::mem::take(&mut self.buf);
            let mut done = false;
            let mut failure = None;
            for (kind, s, body) in frames(&datagram) {
                if s != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => done = true,
                    NLMSG_ERROR => {
                        failure = Some(GenlError::Refused {
                            request: what.to_string(),
                            errno: error_code(body),
                        });
                        break;
                    }
                    _ => match NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(body) {
                        Ok(m) => {
                            if let NetlinkPayload::InnerMessage(g) = m.payload {
                                replies.push(g.payload);
                            }
                        }
                        Err(e) => {
                            failure = Some(GenlError::Protocol(e.to_string()));
                            break;
                        }
                    },
                }
            }
            self.buf = datagram;
            if let Some(f) = failure {
                return Err(f);
            }
            if done {
                return Ok(replies);
            }
        }
    }

    /// Every virtual server (fwmark ones and foreign protocols included, with `key: None`).
    pub fn services(&mut self) -> Result<Vec<genl::DumpedService>, GenlError> {
        self.dump(genl::dump_services(), "GET_SERVICE dump")?
            .iter()
            .map(|m| genl::parse_service(m).map_err(|e| GenlError::Protocol(e.to_string())))
            .collect()
    }

    /// The real servers of one virtual server, with their counters.
    pub fn dests(&mut self, key: &VsKey) -> Result<Vec<(RsKey, DestCounters)>, GenlError> {
        let what = format!("GET_DEST dump of {key}");
        let mut out = Vec::new();
        for m in self.dump(genl::dump_dests(key), &what)? {
            if let Some(d) =
                genl::parse_dest(&m, key.addr).map_err(|e| GenlError::Protocol(e.to_string()))?
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Sends one request that the kernel answers with a message (`GET_CONFIG`) and returns
    /// that answer. It goes with `NLM_F_ACK`, so the end of the exchange is explicit: the
    /// reply, then the ack (or only an error).
    pub fn request(&mut self, msg: IpvsMessage, what: &str) -> Result<IpvsMessage, GenlError> {
        let mut out = Vec::new();
        let seq = self.encode(msg, NLM_F_REQUEST | NLM_F_ACK, &mut out);
        self.socket.send(&out, 0).map_err(io("send a request"))?;
        let mut reply = None;
        loop {
            self.recv()?;
            let datagram = std::mem::take(&mut self.buf);
            let step = answer(&datagram, seq, what);
            self.buf = datagram;
            let (r, acked) = step?;
            if r.is_some() {
                reply = r;
            }
            if acked {
                break;
            }
        }
        reply.ok_or_else(|| GenlError::Protocol(format!("the kernel acked {what} without a reply")))
    }

    /// The kernel's connection timeouts (`GET_CONFIG`).
    pub fn timeouts(&mut self) -> Result<IpvsTimeouts, GenlError> {
        let reply = self.request(genl::get_config(), "GET_CONFIG")?;
        genl::parse_config(&reply).map_err(|e| GenlError::Protocol(e.to_string()))
    }

    /// Sends requests in order, [`BATCH`] per datagram, and checks every ack. Stops at the
    /// first batch with a refusal and reports the first refused request; the rest of that
    /// batch has been processed by the kernel (netlink has no transactions).
    pub fn execute(&mut self, requests: Vec<Request>) -> Result<(), GenlError> {
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            let chunk: Vec<Request> = requests.by_ref().take(BATCH).collect();
            let mut out = Vec::new();
            let mut pending: Vec<(u32, String, &'static [i32])> = Vec::with_capacity(chunk.len());
            for r in chunk {
                let seq = self.encode(r.msg, NLM_F_REQUEST | NLM_F_ACK, &mut out);
                pending.push((seq, r.what, r.tolerate));
            }
            self.socket.send(&out, 0).map_err(io("send requests"))?;
            let mut acked = 0usize;
            let mut first_error: Option<GenlError> = None;
            while acked < pending.len() {
                self.recv()?;
                let datagram = std::mem::take(&mut self.buf);
                for (kind, seq, body) in frames(&datagram) {
                    if kind != NLMSG_ERROR {
                        continue;
                    }
                    let Some((_, what, tolerate)) = pending.iter().find(|p| p.0 == seq) else {
                        continue;
                    };
                    acked += 1;
                    let errno = error_code(body);
                    if errno != 0 && !tolerate.contains(&errno) && first_error.is_none() {
                        first_error = Some(GenlError::Refused {
                            request: what.clone(),
                            errno,
                        });
                    }
                }
                self.buf = datagram;
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// What one datagram says about request `seq`: its decoded reply, if it holds one, and whether
/// the ack came. An error for `seq` is [`GenlError::Refused`].
fn answer(datagram: &[u8], seq: u32, what: &str) -> Result<(Option<IpvsMessage>, bool), GenlError> {
    let mut reply = None;
    let mut acked = false;
    for (kind, s, body) in frames(datagram) {
        if s != seq {
            continue;
        }
        if kind == NLMSG_ERROR {
            let errno = error_code(body);
            if errno != 0 {
                return Err(GenlError::Refused {
                    request: what.to_string(),
                    errno,
                });
            }
            acked = true;
            continue;
        }
        let m = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(body)
            .map_err(|e| GenlError::Protocol(e.to_string()))?;
        if let NetlinkPayload::InnerMessage(g) = m.payload {
            reply = Some(g.payload);
        }
    }
    Ok((reply, acked))
}

/// `(type, seq, message)` of each message in a datagram (`message` includes its header).
fn frames(datagram: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    while let Some(h) = datagram.get(offset..offset + NLMSG_HDRLEN) {
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        let Some(msg) = datagram.get(offset..offset + len) else {
            break;
        };
        if len < NLMSG_HDRLEN {
            break;
        }
        out.push((kind, seq, msg));
        offset += (len + 3) & !3;
    }
    out
}

/// The positive errno of an `NLMSG_ERROR` message (0: an ack).
fn error_code(msg: &[u8]) -> i32 {
    msg.get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
        .map_or(0, |c| -i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// Two messages in one datagram: an ack and an EEXIST refusal (nlmsgerr: error, then the
    /// original header).
    #[test]
    fn splits_acks_and_refusals() {
        let mut d = Vec::new();
        for (seq, errno) in [(5u32, 0i32), (6, -17)] {
            d.extend_from_slice(&36u32.to_ne_bytes());
            d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            d.extend_from_slice(&0u16.to_ne_bytes());
            d.extend_from_slice(&seq.to_ne_bytes());
            d.extend_from_slice(&0u32.to_ne_bytes());
            d.extend_from_slice(&errno.to_ne_bytes());
            d.extend_from_slice(&[0u8; 16]);
        }
        let f = frames(&d);
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].0, f[0].1, error_code(f[0].2)), (NLMSG_ERROR, 5, 0));
        assert_eq!(
            (f[1].0, f[1].1, error_code(f[1].2)),
            (NLMSG_ERROR, 6, EEXIST)
        );
        // A truncated tail is ignored, not a panic.
        assert_eq!(frames(&d[..50]).len(), 1);
    }

    fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&36u32.to_ne_bytes());
        d.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        d.extend_from_slice(&0u16.to_ne_bytes());
        d.extend_from_slice(&seq.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(&(-errno).to_ne_bytes());
        d.extend_from_slice(&[0u8; 16]);
        d
    }

    /// `GET_CONFIG`'s exchange: the reply (command SET_CONFIG, family id in the type), then
    /// the ack, in one datagram or two; another request's messages are ignored.
    #[test]
    fn a_request_reads_its_reply_then_its_ack() {
        let want = IpvsTimeouts {
            tcp: 901,
            tcp_fin: 120,
            udp: 31,
        };
        let mut g = GenlMessage::from_payload(genl::set_config(&want));
        g.set_resolved_family_id(0x1a);
        let mut header = NetlinkHeader::default();
        header.sequence_number = 7;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(g));
        nl.finalize();
        let mut reply = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut reply);

        let mut both = reply.clone();
        both.extend(ack(6, 0));
        both.extend(ack(7, 0));
        let (m, acked) = answer(&both, 7, "GET_CONFIG").unwrap();
        assert!(acked);
        assert_eq!(genl::parse_config(&m.unwrap()).unwrap(), want);

        let (m, acked) = answer(&reply, 7, "GET_CONFIG").unwrap();
        assert!(m.is_some() && !acked, "the reply alone: wait for the ack");
        let (m, acked) = answer(&ack(7, 0), 7, "GET_CONFIG").unwrap();
        assert!(m.is_none() && acked);

        // EPERM without CAP_NET_ADMIN: a refusal naming the request.
        let err = answer(&ack(7, 1), 7, "GET_CONFIG").unwrap_err();
        assert!(matches!(err, GenlError::Refused { errno: 1, .. }), "{err}");
        assert!(err.to_string().contains("GET_CONFIG"), "{err}");
    }
}
