//! Set and map types, and the byte encoding of elements written in the model's canonical
//! strings (the form `nft -j list` gives back, see [`crate::live::canon`]).
//!
//! The layout is what nft itself sends (checked against `nft --debug=netlink` in this module's
//! tests): addresses and ports in network byte order; the `numgen` index (`integer`) as a u32 in
//! host byte order; in a concatenation, each field padded with zeros to a multiple of 4 bytes
//! (one 32-bit register each).

use std::net::{Ipv4Addr, Ipv6Addr};

/// One field of a set key or of a map's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `ipv4_addr`: 4 bytes.
    Ipv4,
    /// `ipv6_addr`: 16 bytes.
    Ipv6,
    /// `inet_proto`: 1 byte (`tcp`, `udp`, `sctp` or a number).
    Proto,
    /// `inet_service`: 2 bytes, big-endian.
    Service,
    /// `integer` (the `numgen` index in kproxy's maps): 4 bytes, host byte order.
    Integer,
}

impl Field {
    fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "ipv4_addr" => Field::Ipv4,
            "ipv6_addr" => Field::Ipv6,
            "inet_proto" => Field::Proto,
            "inet_service" => Field::Service,
            "integer" => Field::Integer,
            _ => return None,
        })
    }

    fn encode(self, text: &str, out: &mut Vec<u8>) -> Option<()> {
        match self {
            Field::Ipv4 => out.extend_from_slice(&text.parse::<Ipv4Addr>().ok()?.octets()),
            Field::Ipv6 => out.extend_from_slice(&text.parse::<Ipv6Addr>().ok()?.octets()),
            Field::Proto => out.push(match text {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                n => n.parse().ok()?,
            }),
            Field::Service => out.extend_from_slice(&text.parse::<u16>().ok()?.to_be_bytes()),
            Field::Integer => out.extend_from_slice(&text.parse::<u32>().ok()?.to_ne_bytes()),
        }
        Some(())
    }
}

/// What a map's elements map to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataType {
    /// A set: no data.
    None,
    /// `verdict`: `goto CHAIN`, `jump CHAIN`, `drop`, `accept`, ...
    Verdict,
    /// A value of these fields.
    Value(Vec<Field>),
}

/// A set's or map's type, as far as element encoding needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetType {
    /// The key's fields (more than one: a concatenation).
    pub key: Vec<Field>,
    /// The data's type.
    pub data: DataType,
    /// `flags interval`: elements are ranges, encoded as two elements. kproxy keeps these sets
    /// on the `nft -f` path, which does that (and prefix merging) for it.
    pub interval: bool,
}

/// Why an element or a type cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A type this encoder does not know.
    #[error("unsupported set type `{0}`")]
    Type(String),
    /// An element that does not fit its set's type.
    #[error("`{text}` is not a valid {what} of type `{ty}`")]
    Element {
        /// The key or value text.
        text: String,
        /// `key`, `value` or `verdict`.
        what: &'static str,
        /// The type, for the message.
        ty: String,
    },
}

/// Verdict codes (`include/uapi/linux/netfilter/nf_tables.h`, `netfilter.h`).
pub mod verdict {
    /// `drop` (NF_DROP).
    pub const DROP: i32 = 0;
    /// `accept` (NF_ACCEPT).
    pub const ACCEPT: i32 = 1;
    /// `continue` (NFT_CONTINUE).
    pub const CONTINUE: i32 = -1;
    /// `jump CHAIN` (NFT_JUMP).
    pub const JUMP: i32 = -3;
    /// `goto CHAIN` (NFT_GOTO).
    pub const GOTO: i32 = -4;
    /// `return` (NFT_RETURN).
    pub const RETURN: i32 = -5;
}

/// A map element's data, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data<'a> {
    /// NFTA_DATA_VERDICT: a code and, for `jump`/`goto`, a chain.
    Verdict(i32, Option<&'a str>),
    /// NFTA_DATA_VALUE: bytes.
    Value(Vec<u8>),
}

impl SetType {
    /// Parses a [`crate::model::Set::signature`]: `KEY[ . KEY...][ : DATA][ flags F,...][ timeout N]`.
    pub fn parse(signature: &str) -> Result<SetType, EncodeError> {
        let bad = || EncodeError::Type(signature.to_string());
        let (types, flags) = match signature.split_once(" flags ") {
            Some((t, f)) => (t, f),
            None => (
                signature
                    .split_once(" timeout ")
                    .map_or(signature, |(t, _)| t),
                "",
            ),
        };
        let interval = flags
            .split(|c: char| c == ',' || c.is_whitespace())
            .any(|f| f == "interval");
        let (key, data) = match types.split_once(" : ") {
            Some((k, d)) => (k, Some(d)),
            None => (types, None),
        };
        let fields = |s: &str| -> Result<Vec<Field>, EncodeError> {
            s.split(" . ")
                .map(|f| Field::parse(f.trim()).ok_or_else(bad))
                .collect()
        };
        let data = match data {
            None => DataType::None,
            Some("verdict") => DataType::Verdict,
            Some(d) => DataType::Value(fields(d)?),
        };
        Ok(SetType {
            key: fields(key)?,
            data,
            interval,
        })
    }

    /// The NFTA_DATA_VALUE bytes of a key.
    pub fn encode_key(&self, text: &str) -> Result<Vec<u8>, EncodeError> {
        encode_fields(&self.key, text).ok_or_else(|| EncodeError::Element {
            text: text.to_string(),
            what: "key",
            ty: describe(&self.key),
        })
    }

    /// A map element's data; `None` for a set.
    pub fn encode_data<'a>(&self, text: Option<&'a str>) -> Result<Option<Data<'a>>, EncodeError> {
        match (&self.data, text) {
            (DataType::None, None) => Ok(None),
            (DataType::Verdict, Some(t)) => parse_verdict(t)
                .map(|(code, chain)| Some(Data::Verdict(code, chain)))
                .ok_or_else(|| EncodeError::Element {
                    text: t.to_string(),
                    what: "verdict",
                    ty: "verdict".into(),
                }),
            (DataType::Value(fields), Some(t)) => encode_fields(fields, t)
                .map(|v| Some(Data::Value(v)))
                .ok_or_else(|| EncodeError::Element {
                    text: t.to_string(),
                    what: "value",
                    ty: describe(fields),
                }),
            (_, t) => Err(EncodeError::Element {
                text: t.unwrap_or("<none>").to_string(),
                what: "value",
                ty: match &self.data {
                    DataType::None => "no value (a set)".into(),
                    DataType::Verdict => "verdict".into(),
                    DataType::Value(f) => describe(f),
                },
            }),
        }
    }
}

fn describe(fields: &[Field]) -> String {
    fields
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(" . ")
}

/// Fields joined by ` . `; a concatenation pads every field to 4 bytes.
fn encode_fields(fields: &[Field], text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(fields.len() * 4 + 16);
    let mut parts = text.split(" . ");
    let concat = fields.len() > 1;
    for field in fields {
        field.encode(parts.next()?.trim(), &mut out)?;
        if concat {
            out.resize(out.len().next_multiple_of(4), 0);
        }
    }
    parts.next().is_none().then_some(out)
}

/// `goto pick-3` → (GOTO, Some("pick-3")); `drop` → (DROP, None).
fn parse_verdict(text: &str) -> Option<(i32, Option<&str>)> {
    let mut words = text.split_whitespace();
    let verb = words.next()?;
    let chain = words.next();
    if words.next().is_some() {
        return None;
    }
    let code = match (verb, chain) {
        ("goto", Some(_)) => verdict::GOTO,
        ("jump", Some(_)) => verdict::JUMP,
        ("drop", None) => verdict::DROP,
        ("accept", None) => verdict::ACCEPT,
        ("continue", None) => verdict::CONTINUE,
        ("return", None) => verdict::RETURN,
        _ => return None,
    };
    Some((code, chain))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    /// `nft --debug=netlink` prints element data as 32-bit words in host byte order; these
    /// turn the words it printed (nft 1.0.6, this machine) back into bytes.
    fn words(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn endpoint_key_and_value_match_what_nft_sends() {
        // add element ip kproxy endpoints-tcp { 10.96.0.10 . tcp . 80 . 3 : 10.244.1.5 . 8080 }
        // element 0a00600a 00000006 00005000 00000003  : 0501f40a 0000901f 0 [end]
        let t = SetType::parse(
            "ipv4_addr . inet_proto . inet_service . integer : ipv4_addr . inet_service",
        )
        .unwrap();
        assert_eq!(
            t.encode_key("10.96.0.10 . tcp . 80 . 3").unwrap(),
            words(&[0x0a00600a, 0x00000006, 0x00005000, 0x00000003])
        );
        assert_eq!(
            t.encode_data(Some("10.244.1.5 . 8080")).unwrap(),
            Some(Data::Value(words(&[0x0501f40a, 0x0000901f])))
        );
    }

    #[test]
    fn verdict_map_elements_match_what_nft_sends() {
        // element 0a00600a 00000006 00005000  : goto -> pick-3
        // element 0b00600a 00000011 00003500  : drop
        let t = SetType::parse("ipv4_addr . inet_proto . inet_service : verdict").unwrap();
        assert_eq!(
            t.encode_key("10.96.0.10 . tcp . 80").unwrap(),
            words(&[0x0a00600a, 0x00000006, 0x00005000])
        );
        assert_eq!(
            t.encode_key("10.96.0.11 . udp . 53").unwrap(),
            words(&[0x0b00600a, 0x00000011, 0x00003500])
        );
        assert_eq!(
            t.encode_data(Some("goto pick-3")).unwrap(),
            Some(Data::Verdict(verdict::GOTO, Some("pick-3")))
        );
        assert_eq!(
            t.encode_data(Some("drop")).unwrap(),
            Some(Data::Verdict(verdict::DROP, None))
        );
        // element 00000006 00008075  : goto -> pick-3
        let np = SetType::parse("inet_proto . inet_service : verdict").unwrap();
        assert_eq!(
            np.encode_key("tcp . 30080").unwrap(),
            words(&[0x00000006, 0x00008075])
        );
    }

    #[test]
    fn single_field_and_v6_keys_match_what_nft_sends() {
        // element 0a00600a (cluster-ips)
        let t = SetType::parse("ipv4_addr").unwrap();
        assert_eq!(t.encode_key("10.96.0.10").unwrap(), words(&[0x0a00600a]));
        assert_eq!(t.encode_data(None).unwrap(), None);
        // element 000000fd 00000000 00000000 01000000 000000fd ... (hairpin fd00::1 . fd00::1)
        let h = SetType::parse("ipv6_addr . ipv6_addr").unwrap();
        assert_eq!(
            h.encode_key("fd00::1 . fd00::1").unwrap(),
            words(&[0x000000fd, 0, 0, 0x01000000, 0x000000fd, 0, 0, 0x01000000])
        );
    }

    #[test]
    fn signatures_with_flags_and_timeouts() {
        let t = SetType::parse("ipv4_addr flags interval").unwrap();
        assert!(t.interval);
        let t = SetType::parse("ipv6_addr flags timeout timeout 600").unwrap();
        assert!(!t.interval);
        assert_eq!(t.key, vec![Field::Ipv6]);
        let t = SetType::parse("ipv4_addr . inet_proto . inet_service . ipv4_addr flags interval")
            .unwrap();
        assert!(t.interval && t.key.len() == 4);
        assert!(SetType::parse("ether_addr").is_err());
        assert!(SetType::parse("").is_err());
    }

    #[test]
    fn bad_elements_are_errors_not_panics() {
        let t = SetType::parse("ipv4_addr . inet_proto . inet_service : verdict").unwrap();
        for bad in [
            "10.96.0.10 . tcp",
            "10.96.0.10 . tcp . 80 . 1",
            "fd00::1 . tcp . 80",
            "10.96.0.10 . xyz . 80",
            "10.96.0.10 . tcp . 70000",
            "",
        ] {
            assert!(t.encode_key(bad).is_err(), "{bad}");
        }
        for bad in ["goto", "goto a b", "jump", "drop x", "maybe", ""] {
            assert!(t.encode_data(Some(bad)).is_err(), "{bad}");
        }
        assert!(t.encode_data(None).is_err());
        let set = SetType::parse("ipv4_addr").unwrap();
        assert!(set.encode_data(Some("drop")).is_err());
    }
}
