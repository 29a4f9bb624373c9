//! The IPVS generic-netlink family (`"IPVS"`, version 1): commands and attributes as the
//! kernel's uapi `include/uapi/linux/ip_vs.h` lays them out, on `netlink-packet-generic`'s
//! header and `netlink-packet-core`'s attribute framing.
//!
//! Layout notes the kernel enforces (`ip_vs_genl_parse_service` / `_dest` with a full entry):
//! NEW/SET_SERVICE must carry the scheduler, flags, timeout and netmask; NEW/SET_DEST must carry
//! the forwarding method, weight and both thresholds. Addresses are 16 bytes
//! (`union nf_inet_addr`), ports are big-endian, everything else is host order. The IPv4 netmask
//! is a mask (`0xffffffff`), the IPv6 one a prefix length (128).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kproxy_contract::Protocol;
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLA_F_NESTED, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use crate::model::{DestCounters, IpvsTimeouts, RsKey, VsConfig, VsKey};

/// The family name the controller resolves.
pub const FAMILY: &str = "IPVS";
const VERSION: u8 = 1;

/// `IPVS_CMD_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cmd {
    /// Add a virtual server.
    NewService = 1,
    /// Change a virtual server's settings.
    SetService = 2,
    /// Delete a virtual server (and its real servers).
    DelService = 3,
    /// Get (or dump) virtual servers.
    GetService = 4,
    /// Add a real server.
    NewDest = 5,
    /// Change a real server's weight.
    SetDest = 6,
    /// Delete a real server.
    DelDest = 7,
    /// Dump a virtual server's real servers.
    GetDest = 8,
    /// Set the connection timeouts (`ipvsadm --set`); also the command of `GET_CONFIG`'s
    /// reply.
    SetConfig = 12,
    /// Read the connection timeouts.
    GetConfig = 13,
}

impl Cmd {
    fn from_u8(v: u8) -> Option<Cmd> {
        Some(match v {
            1 => Cmd::NewService,
            2 => Cmd::SetService,
            3 => Cmd::DelService,
            4 => Cmd::GetService,
            5 => Cmd::NewDest,
            6 => Cmd::SetDest,
            7 => Cmd::DelDest,
            8 => Cmd::GetDest,
            12 => Cmd::SetConfig,
            13 => Cmd::GetConfig,
            _ => return None,
        })
    }
}

// IPVS_CMD_ATTR_*
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const CMD_ATTR_TIMEOUT_UDP: u16 = 6;
// IPVS_SVC_ATTR_*
const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;
// IPVS_DEST_ATTR_*
const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`.
pub const F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding (the only method that works with endpoints behind the
/// node, and upstream's).
pub const FWD_MASQ: u32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;
const IPPROTO_UDP: u16 = 17;
const IPPROTO_SCTP: u16 = 132;

/// One attribute: a kind and its raw value (nested attributes hold their encoded children).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    kind: u16,
    value: Vec<u8>,
}

impl Attr {
    fn u16(kind: u16, v: u16) -> Attr {
        Attr {
            kind,
            value: v.to_ne_bytes().to_vec(),
        }
    }
    fn u32(kind: u16, v: u32) -> Attr {
        Attr {
            kind,
            value: v.to_ne_bytes().to_vec(),
        }
    }
    fn be16(kind: u16, v: u16) -> Attr {
        Attr {
            kind,
            value: v.to_be_bytes().to_vec(),
        }
    }
    fn addr(kind: u16, ip: IpAddr) -> Attr {
        let mut value = vec![0u8; 16];
        match ip {
            IpAddr::V4(a) => value[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => value.copy_from_slice(&a.octets()),
        }
        Attr { kind, value }
    }
    fn nested(kind: u16, children: &[Attr]) -> Attr {
        let mut value = vec![0u8; children.buffer_len()];
        children.emit(&mut value);
        Attr {
            kind: kind | NLA_F_NESTED,
            value,
        }
    }
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        self.value.len()
    }
    fn kind(&self) -> u16 {
        self.kind
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer[..self.value.len()].copy_from_slice(&self.value);
    }
}

/// One IPVS message: a command and its top-level attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    /// The command.
    pub cmd: u8,
    /// Top-level attributes (`IPVS_CMD_ATTR_*`).
    pub attrs: Vec<Attr>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer);
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(IpvsMessage {
            cmd: header.cmd,
            attrs: parse_attrs(buf)?,
        })
    }
}

fn parse_attrs(buf: &[u8]) -> Result<Vec<Attr>, DecodeError> {
    let mut out = Vec::new();
    for nla in NlasIterator::new(buf) {
        let nla: NlaBuffer<&[u8]> = nla?;
        let d = DefaultNla::parse(&nla)?;
        let mut value = vec![0u8; d.value_len()];
        d.emit_value(&mut value);
        out.push(Attr {
            kind: nla.kind() & !NLA_F_NESTED,
            value,
        });
    }
    Ok(out)
}

fn af(ip: &IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn proto_num(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// The attributes that identify a virtual server.
fn service_id(key: &VsKey) -> Vec<Attr> {
    vec![
        Attr::u16(SVC_AF, af(&key.addr)),
        Attr::u16(SVC_PROTOCOL, proto_num(key.protocol)),
        Attr::addr(SVC_ADDR, key.addr),
        Attr::be16(SVC_PORT, key.port),
    ]
}

/// A full service entry (NEW/SET_SERVICE).
fn service_full(key: &VsKey, config: &VsConfig) -> Vec<Attr> {
    let mut attrs = service_id(key);
    let mut sched = config.scheduler.as_bytes().to_vec();
    sched.push(0);
    attrs.push(Attr {
        kind: SVC_SCHED_NAME,
        value: sched,
    });
    let flags = if config.persistence.is_some() {
        F_PERSISTENT
    } else {
        0
    };
    // struct ip_vs_flags { __u32 flags; __u32 mask; }: the mask says which bits to set.
    let mut fl = flags.to_ne_bytes().to_vec();
    fl.extend_from_slice(&u32::MAX.to_ne_bytes());
    attrs.push(Attr {
        kind: SVC_FLAGS,
        value: fl,
    });
    attrs.push(Attr::u32(SVC_TIMEOUT, config.persistence.unwrap_or(0)));
    let netmask = match key.addr {
        IpAddr::V4(_) => u32::MAX,
        IpAddr::V6(_) => 128,
    };
    attrs.push(Attr::u32(SVC_NETMASK, netmask));
    attrs
}

fn dest_attrs(rs: &RsKey, weight: Option<u32>) -> Vec<Attr> {
    let mut attrs = vec![
        Attr::addr(DEST_ADDR, rs.addr),
        Attr::be16(DEST_PORT, rs.port),
    ];
    if let Some(w) = weight {
        attrs.push(Attr::u32(DEST_FWD_METHOD, FWD_MASQ));
        attrs.push(Attr::u32(DEST_WEIGHT, w));
        attrs.push(Attr::u32(DEST_U_THRESH, 0));
        attrs.push(Attr::u32(DEST_L_THRESH, 0));
    }
    attrs.push(Attr::u16(DEST_ADDR_FAMILY, af(&rs.addr)));
    attrs
}

/// Builds the message for one change.
pub fn new_service(key: &VsKey, config: &VsConfig) -> IpvsMessage {
    msg(
        Cmd::NewService,
        vec![Attr::nested(CMD_ATTR_SERVICE, &service_full(key, config))],
    )
}

/// `SET_SERVICE`: new scheduler or persistence.
pub fn set_service(key: &VsKey, config: &VsConfig) -> IpvsMessage {
    msg(
        Cmd::SetService,
        vec![Attr::nested(CMD_ATTR_SERVICE, &service_full(key, config))],
    )
}

/// `DEL_SERVICE`.
pub fn del_service(key: &VsKey) -> IpvsMessage {
    msg(
        Cmd::DelService,
        vec![Attr::nested(CMD_ATTR_SERVICE, &service_id(key))],
    )
}

/// `NEW_DEST` (add) or `SET_DEST` (new weight).
pub fn put_dest(update: bool, key: &VsKey, rs: &RsKey, weight: u32) -> IpvsMessage {
    msg(
        if update { Cmd::SetDest } else { Cmd::NewDest },
        vec![
            Attr::nested(CMD_ATTR_SERVICE, &service_id(key)),
            Attr::nested(CMD_ATTR_DEST, &dest_attrs(rs, Some(weight))),
        ],
    )
}

/// `DEL_DEST`.
pub fn del_dest(key: &VsKey, rs: &RsKey) -> IpvsMessage {
    msg(
        Cmd::DelDest,
        vec![
            Attr::nested(CMD_ATTR_SERVICE, &service_id(key)),
            Attr::nested(CMD_ATTR_DEST, &dest_attrs(rs, None)),
        ],
    )
}

/// `GET_SERVICE` (sent with `NLM_F_DUMP`).
pub fn dump_services() -> IpvsMessage {
    msg(Cmd::GetService, Vec::new())
}

/// `GET_DEST` for one virtual server (sent with `NLM_F_DUMP`).
pub fn dump_dests(key: &VsKey) -> IpvsMessage {
    msg(
        Cmd::GetDest,
        vec![Attr::nested(CMD_ATTR_SERVICE, &service_id(key))],
    )
}

/// `SET_CONFIG`: the three timeouts as top-level u32 attributes, all of them always (as
/// `ipvsadm --set` sends them): the kernel starts from its current values and changes only the
/// nonzero ones (`ip_vs_set_timeout`), so a zero leaves that timeout alone.
pub fn set_config(t: &IpvsTimeouts) -> IpvsMessage {
    msg(
        Cmd::SetConfig,
        vec![
            Attr::u32(CMD_ATTR_TIMEOUT_TCP, t.tcp),
            Attr::u32(CMD_ATTR_TIMEOUT_TCP_FIN, t.tcp_fin),
            Attr::u32(CMD_ATTR_TIMEOUT_UDP, t.udp),
        ],
    )
}

/// `GET_CONFIG` (a plain request: the kernel has no dump for it).
pub fn get_config() -> IpvsMessage {
    msg(Cmd::GetConfig, Vec::new())
}

/// Decodes `GET_CONFIG`'s reply (command `SET_CONFIG`, the same three attributes). A kernel
/// built without TCP or UDP support omits that protocol's attributes: they read as 0.
pub fn parse_config(m: &IpvsMessage) -> Result<IpvsTimeouts, DecodeError> {
    let get = |kind| -> Result<u32, DecodeError> {
        Ok(find(&m.attrs, kind).map(read_u32).transpose()?.unwrap_or(0))
    };
    Ok(IpvsTimeouts {
        tcp: get(CMD_ATTR_TIMEOUT_TCP)?,
        tcp_fin: get(CMD_ATTR_TIMEOUT_TCP_FIN)?,
        udp: get(CMD_ATTR_TIMEOUT_UDP)?,
    })
}

fn msg(cmd: Cmd, attrs: Vec<Attr>) -> IpvsMessage {
    IpvsMessage {
        cmd: cmd as u8,
        attrs,
    }
}

/// A virtual server as a dump reports it. Fwmark services and unknown protocols are `None`
/// in `key` (kproxy never creates them, so they are never its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedService {
    /// Its identity, when it is an address/protocol/port service kproxy could own.
    pub key: Option<VsKey>,
    /// Its settings.
    pub config: VsConfig,
}

/// Decodes one `GET_SERVICE` reply.
pub fn parse_service(m: &IpvsMessage) -> Result<DumpedService, DecodeError> {
    let nested = find(&m.attrs, CMD_ATTR_SERVICE).ok_or("no IPVS_CMD_ATTR_SERVICE")?;
    let attrs = parse_attrs(nested)?;
    let family = find(&attrs, SVC_AF).map(read_u16).transpose()?;
    let protocol = find(&attrs, SVC_PROTOCOL).map(read_u16).transpose()?;
    let addr = find(&attrs, SVC_ADDR);
    let port = find(&attrs, SVC_PORT).map(read_be16).transpose()?;
    let scheduler = find(&attrs, SVC_SCHED_NAME)
        .map(|v| {
            String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
        })
        .unwrap_or_default();
    let flags = find(&attrs, SVC_FLAGS)
        .map(|v| read_u32(v.get(..4).unwrap_or_default()))
        .transpose()?
        .unwrap_or(0);
    let timeout = find(&attrs, SVC_TIMEOUT)
        .map(read_u32)
        .transpose()?
        .unwrap_or(0);
    let protocol = match protocol {
        Some(IPPROTO_TCP) => Some(Protocol::Tcp),
        Some(IPPROTO_UDP) => Some(Protocol::Udp),
        Some(IPPROTO_SCTP) => Some(Protocol::Sctp),
        _ => None,
    };
    let key = match (family, protocol, addr, port) {
        (Some(f), Some(protocol), Some(a), Some(port)) => read_addr(f, a).map(|addr| VsKey {
            addr,
            protocol,
            port,
        }),
        _ => None,
    };
    Ok(DumpedService {
        key,
        config: VsConfig {
            scheduler,
            persistence: (flags & F_PERSISTENT != 0).then_some(timeout),
        },
    })
}

/// Decodes one `GET_DEST` reply; `family` is the virtual server's (used when the kernel omits
/// the destination's own family).
pub fn parse_dest(
    m: &IpvsMessage,
    family: IpAddr,
) -> Result<Option<(RsKey, DestCounters)>, DecodeError> {
    let nested = find(&m.attrs, CMD_ATTR_DEST).ok_or("no IPVS_CMD_ATTR_DEST")?;
    let attrs = parse_attrs(nested)?;
    let af = match find(&attrs, DEST_ADDR_FAMILY).map(read_u16).transpose()? {
        Some(f) => f,
        None => self::af(&family),
    };
    let Some(addr) = find(&attrs, DEST_ADDR).and_then(|a| read_addr(af, a)) else {
        return Ok(None);
    };
    let port = find(&attrs, DEST_PORT)
        .map(read_be16)
        .transpose()?
        .unwrap_or(0);
    let get = |kind| -> Result<u32, DecodeError> {
        Ok(find(&attrs, kind).map(read_u32).transpose()?.unwrap_or(0))
    };
    Ok(Some((
        RsKey { addr, port },
        DestCounters {
            weight: get(DEST_WEIGHT)?,
            active: get(DEST_ACTIVE_CONNS)?,
            inactive: get(DEST_INACT_CONNS)?,
        },
    )))
}

/// The command of a decoded message, if known.
pub fn command(m: &IpvsMessage) -> Option<Cmd> {
    Cmd::from_u8(m.cmd)
}

fn find(attrs: &[Attr], kind: u16) -> Option<&[u8]> {
    attrs
        .iter()
        .find(|a| a.kind == kind)
        .map(|a| a.value.as_slice())
}

fn read_u16(v: &[u8]) -> Result<u16, DecodeError> {
    v.get(..2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .ok_or_else(|| DecodeError::invalid_number(2, v.len()))
}

fn read_be16(v: &[u8]) -> Result<u16, DecodeError> {
    v.get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| DecodeError::invalid_number(2, v.len()))
}

fn read_u32(v: &[u8]) -> Result<u32, DecodeError> {
    v.get(..4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| DecodeError::invalid_number(4, v.len()))
}

fn read_addr(af: u16, v: &[u8]) -> Option<IpAddr> {
    match af {
        AF_INET => {
            let b: [u8; 4] = v.get(..4)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        AF_INET6 => {
            let b: [u8; 16] = v.get(..16)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    //! Golden bytes written from the uapi layout of `ip_vs.h` (attribute numbers, sizes and
    //! byte orders), not from this encoder's output.
    #![allow(clippy::unwrap_used, reason = "tests")]

    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage};
    use netlink_packet_generic::GenlMessage;

    use super::*;

    fn encode(m: IpvsMessage, family_id: u16, seq: u32) -> Vec<u8> {
        let mut g = GenlMessage::from_payload(m);
        g.set_resolved_family_id(family_id);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        header.sequence_number = seq;
        let mut nl = NetlinkMessage::new(header, g.into());
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        buf
    }

    fn key() -> VsKey {
        VsKey {
            addr: "10.96.0.10".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    /// `ipvsadm -A -t 10.96.0.10:80 -s rr -p 10800` as the kernel expects it.
    #[test]
    fn new_service_matches_the_uapi_layout() {
        let config = VsConfig {
            scheduler: "rr".into(),
            persistence: Some(10800),
        };
        let got = encode(new_service(&key(), &config), 0x1a, 7);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            // nlmsghdr: len 104, type 0x1a (family id), flags REQUEST|ACK, seq 7, pid 0
            104, 0, 0, 0, 0x1a, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0,
            // genlmsghdr: cmd NEW_SERVICE (1), version 1, reserved
            1, 1, 0, 0,
            // IPVS_CMD_ATTR_SERVICE, nested: len 84, type 1 | NLA_F_NESTED
            84, 0, 1, 0x80,
            // IPVS_SVC_ATTR_AF = AF_INET (u16), padded
            6, 0, 1, 0, 2, 0, 0, 0,
            // IPVS_SVC_ATTR_PROTOCOL = IPPROTO_TCP (u16), padded
            6, 0, 2, 0, 6, 0, 0, 0,
            // IPVS_SVC_ATTR_ADDR: union nf_inet_addr (16 bytes), IPv4 in the first four
            20, 0, 3, 0, 10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            // IPVS_SVC_ATTR_PORT = 80, big-endian, padded
            6, 0, 4, 0, 0, 80, 0, 0,
            // IPVS_SVC_ATTR_SCHED_NAME = "rr\0", padded
            7, 0, 6, 0, b'r', b'r', 0, 0,
            // IPVS_SVC_ATTR_FLAGS = { flags PERSISTENT, mask ~0 }
            12, 0, 7, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
            // IPVS_SVC_ATTR_TIMEOUT = 10800
            8, 0, 8, 0, 0x30, 0x2a, 0, 0,
            // IPVS_SVC_ATTR_NETMASK = 255.255.255.255
            8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff,
        ];
        assert_eq!(got, want);
    }

    /// `ipvsadm -a -t [fd00::1]:53 ... -r [fd00::2]:5353 -m -w 1` (UDP, IPv6).
    #[test]
    fn new_dest_matches_the_uapi_layout() {
        let vs = VsKey {
            addr: "fd00::1".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        let rs = RsKey {
            addr: "fd00::2".parse().unwrap(),
            port: 5353,
        };
        let got = encode(put_dest(false, &vs, &rs, 1), 0x1a, 1);
        #[rustfmt::skip]
        let mut want: Vec<u8> = vec![
            0, 0, 0, 0, 0x1a, 0, 5, 0, 1, 0, 0, 0, 0, 0, 0, 0,
            5, 1, 0, 0, // NEW_DEST
            // service id: AF, PROTOCOL, ADDR, PORT = 4 + 8 + 8 + 20 + 8
            48, 0, 1, 0x80,
            6, 0, 1, 0, 10, 0, 0, 0,
            6, 0, 2, 0, 17, 0, 0, 0,
            20, 0, 3, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            6, 0, 4, 0, 0, 53, 0, 0,
            // IPVS_CMD_ATTR_DEST: ADDR, PORT, FWD_METHOD, WEIGHT, U_THRESH, L_THRESH, ADDR_FAMILY
            72, 0, 2, 0x80,
            20, 0, 1, 0, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
            6, 0, 2, 0, 0x14, 0xe9, 0, 0,
            8, 0, 3, 0, 0, 0, 0, 0,
            8, 0, 4, 0, 1, 0, 0, 0,
            8, 0, 5, 0, 0, 0, 0, 0,
            8, 0, 6, 0, 0, 0, 0, 0,
            6, 0, 11, 0, 10, 0, 0, 0,
        ];
        let len = u8::try_from(want.len()).unwrap();
        want[0] = len;
        assert_eq!(got, want);
    }

    /// A `GET_SERVICE` dump entry as the kernel fills it (`ip_vs_genl_fill_service`), with the
    /// stats nests kproxy ignores.
    #[test]
    fn decodes_a_dumped_service() {
        #[rustfmt::skip]
        let payload: Vec<u8> = vec![
            // IPVS_CMD_ATTR_SERVICE
            80, 0, 1, 0x80,
            6, 0, 1, 0, 2, 0, 0, 0,
            6, 0, 2, 0, 17, 0, 0, 0,
            20, 0, 3, 0, 10, 96, 0, 53, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            6, 0, 4, 0, 0, 53, 0, 0,
            8, 0, 6, 0, b'w', b'r', b'r', 0,
            12, 0, 7, 0, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, // HASHED only
            8, 0, 8, 0, 0, 0, 0, 0,
            // IPVS_SVC_ATTR_STATS (empty nest)
            4, 0, 10, 0x80,
        ];
        let m = IpvsMessage::parse_with_param(
            &payload,
            GenlHeader {
                cmd: Cmd::NewService as u8,
                version: 1,
            },
        )
        .unwrap();
        let s = parse_service(&m).unwrap();
        assert_eq!(
            s.key,
            Some(VsKey {
                addr: "10.96.0.53".parse().unwrap(),
                protocol: Protocol::Udp,
                port: 53
            })
        );
        assert_eq!(s.config.scheduler, "wrr");
        assert_eq!(s.config.persistence, None);
    }

    /// A `GET_DEST` dump entry: weight and connection counters.
    #[test]
    fn decodes_a_dumped_dest() {
        #[rustfmt::skip]
        let payload: Vec<u8> = vec![
            64, 0, 2, 0x80,
            20, 0, 1, 0, 10, 244, 1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            6, 0, 2, 0, 0x1f, 0x90, 0, 0,
            8, 0, 4, 0, 0, 0, 0, 0,     // weight 0 (draining)
            8, 0, 7, 0, 3, 0, 0, 0,     // 3 active
            8, 0, 8, 0, 2, 0, 0, 0,     // 2 inactive
            6, 0, 11, 0, 2, 0, 0, 0,
        ];
        let m = IpvsMessage::parse_with_param(
            &payload,
            GenlHeader {
                cmd: Cmd::NewDest as u8,
                version: 1,
            },
        )
        .unwrap();
        let (rs, c) = parse_dest(&m, "10.96.0.1".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(rs.to_string(), "10.244.1.10:8080");
        assert_eq!(
            c,
            DestCounters {
                weight: 0,
                active: 3,
                inactive: 2
            }
        );
    }

    /// `ipvsadm --set 901 0 31`: three top-level u32 attributes, no nest.
    #[test]
    fn set_config_matches_the_uapi_layout() {
        let t = IpvsTimeouts {
            tcp: 901,
            tcp_fin: 0,
            udp: 31,
        };
        let got = encode(set_config(&t), 0x1a, 3);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            // nlmsghdr: len 44, type 0x1a, flags REQUEST|ACK, seq 3, pid 0
            44, 0, 0, 0, 0x1a, 0, 5, 0, 3, 0, 0, 0, 0, 0, 0, 0,
            // genlmsghdr: cmd SET_CONFIG (12), version 1, reserved
            12, 1, 0, 0,
            // IPVS_CMD_ATTR_TIMEOUT_TCP (4) = 901 = 0x385
            8, 0, 4, 0, 0x85, 0x03, 0, 0,
            // IPVS_CMD_ATTR_TIMEOUT_TCP_FIN (5) = 0: unchanged
            8, 0, 5, 0, 0, 0, 0, 0,
            // IPVS_CMD_ATTR_TIMEOUT_UDP (6) = 31
            8, 0, 6, 0, 31, 0, 0, 0,
        ];
        assert_eq!(got, want);
    }

    /// `GET_CONFIG`: the header alone.
    #[test]
    fn get_config_matches_the_uapi_layout() {
        let got = encode(get_config(), 0x1a, 9);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            20, 0, 0, 0, 0x1a, 0, 5, 0, 9, 0, 0, 0, 0, 0, 0, 0,
            13, 1, 0, 0, // GET_CONFIG, version 1
        ];
        assert_eq!(got, want);
    }

    /// `GET_CONFIG`'s reply as `ip_vs_genl_get_cmd` fills it: command SET_CONFIG, the three
    /// timeouts (here the kernel's defaults 900/120/300).
    #[test]
    fn decodes_the_config_reply() {
        #[rustfmt::skip]
        let payload: Vec<u8> = vec![
            8, 0, 4, 0, 0x84, 0x03, 0, 0,
            8, 0, 5, 0, 120, 0, 0, 0,
            8, 0, 6, 0, 0x2c, 0x01, 0, 0,
        ];
        let m = IpvsMessage::parse_with_param(
            &payload,
            GenlHeader {
                cmd: Cmd::SetConfig as u8,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(command(&m), Some(Cmd::SetConfig));
        assert_eq!(
            parse_config(&m).unwrap(),
            IpvsTimeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 300
            }
        );
        // Without UDP support in the kernel: no UDP attribute, read as 0.
        let tcp_only = IpvsMessage::parse_with_param(
            &payload[..16],
            GenlHeader {
                cmd: Cmd::SetConfig as u8,
                version: 1,
            },
        )
        .unwrap();
        assert_eq!(parse_config(&tcp_only).unwrap().udp, 0);
        // A truncated value is an error.
        let bad = IpvsMessage {
            cmd: Cmd::SetConfig as u8,
            attrs: vec![Attr {
                kind: CMD_ATTR_TIMEOUT_TCP,
                value: vec![1, 2],
            }],
        };
        assert!(parse_config(&bad).is_err());
    }

    #[test]
    fn truncated_attributes_are_errors_not_panics() {
        let m = IpvsMessage {
            cmd: 1,
            attrs: vec![Attr {
                kind: CMD_ATTR_SERVICE,
                value: vec![20, 0, 3, 0, 10],
            }],
        };
        assert!(parse_service(&m).is_err());
        assert!(parse_dest(&m, "10.0.0.1".parse().unwrap()).is_err());
    }
}
