//! Set and map element changes through nf_tables netlink, one batch per sync.
//!
//! Why a small pure-Rust encoder on `netlink-sys` rather than `nftnl`: kproxy only ever needs
//! a few message kinds here (`BATCH_BEGIN`/`END`, `NEWSETELEM`, `DESTROYSETELEM` or
//! `DELSETELEM`, see [`batch::Deletes`]) carrying keys
//! and values of six element types. `nftnl` would bring C libraries (libnftnl, libmnl) needed
//! at build and at run time, tie kproxy to the host's libnftnl version, and still lacks maps,
//! verdict data and concatenations, which would have to be written by hand through
//! `nftnl-sys` with `unsafe` (docs/semantics.md, implementation notes 1-4). The messages are
//! fixed by the
//! kernel's UAPI (`nf_tables.h`), the encoding is checked byte for byte against what nft sends
//! ([`types`], [`batch`] tests) and by reading elements back with `nft -j` in a network
//! namespace (this module's tests). The socket crate is the one the conntrack cleanup uses.
//!
//! Only non-interval sets go through here: an interval set's elements are ranges that nft
//! splits, merges and encodes as two elements each; those few sets (`service-cidrs`,
//! `firewall-allow`) stay on the `nft -f` path (see [`crate::steps`]).

pub mod batch;
pub mod socket;
pub mod types;

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use kproxy_contract::{Cause, IpFamily};

use crate::model::TABLE;
use crate::plan::NftPlan;
use batch::{Batch, Deletes, Op};
use types::{EncodeError, SetType};

/// Why the netlink path did not apply a batch.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Nothing reached nf_tables (no socket, no permission): `nft -f` may still work.
    #[error("nf_tables netlink unavailable: {what}")]
    Unavailable {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A set's type or an element this encoder cannot write (nothing was sent).
    #[error("cannot encode for set {set}")]
    Encode {
        /// The set.
        set: String,
        /// Why.
        #[source]
        source: EncodeError,
    },
    /// The kernel refused the transaction: nothing of it was applied.
    #[error("nf_tables refused to {what}{detail}")]
    Rejected {
        /// The operation, set and element.
        what: String,
        /// The errno.
        errno: i32,
        /// The errno as an error.
        #[source]
        source: io::Error,
        /// The kernel's extended-ACK message, if any.
        detail: String,
        /// A deletion that found no element (ENOENT), when the kernel named it.
        missing: Option<MissingElement>,
    },
    /// Replies that could not be read: whether the batch was applied is unknown.
    #[error("nf_tables netlink: {0}")]
    Protocol(String),
}

/// An element a `DELSETELEM` did not find: already deleted, by another kproxy applying the
/// same change, or by hand.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MissingElement {
    /// The family of its table.
    pub family: IpFamily,
    /// The set or map.
    pub set: String,
    /// Its key.
    pub key: String,
}

impl NetlinkError {
    /// Whether `nft -f` should be tried instead (the kernel saw nothing of this batch).
    pub fn use_nft_instead(&self) -> bool {
        matches!(
            self,
            NetlinkError::Unavailable { .. } | NetlinkError::Encode { .. }
        )
    }
}

impl From<NetlinkError> for Cause {
    fn from(e: NetlinkError) -> Self {
        Cause::Netlink {
            interface: "nf_tables netlink",
            cause: Box::new(e),
        }
    }
}

/// Whether a set of this signature takes element changes through netlink.
pub fn handles(signature: &str) -> bool {
    SetType::parse(signature).is_ok_and(|t| !t.interval)
}

/// One batch with every element deletion, then every addition, of the plan's non-interval
/// sets, both families, deleting as `deletes` says and leaving out the deletions of `missing`
/// (elements known to be gone already). `None` when there are none.
pub fn encode<'a>(
    plan: &'a NftPlan,
    deletes: Deletes,
    missing: &BTreeSet<MissingElement>,
) -> Result<Option<Batch<'a>>, NetlinkError> {
    // A fresh range of sequence numbers per batch, so a reused socket can never match a reply
    // to the wrong batch.
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let mut batch = Batch::with_deletes(NEXT.fetch_add(1 << 20, Ordering::Relaxed), deletes);
    for op in [Op::Delete, Op::Add] {
        for (family, fp) in &plan.families {
            let changes = match op {
                Op::Delete => &fp.delete_elements,
                Op::Add => &fp.add_elements,
            };
            for (set, elements) in changes {
                let encode_err = |source| NetlinkError::Encode {
                    set: set.clone(),
                    source,
                };
                let signature = fp
                    .signatures
                    .get(set)
                    .ok_or_else(|| encode_err(EncodeError::Type("<unknown set>".into())))?;
                let ty = SetType::parse(signature).map_err(encode_err)?;
                if ty.interval {
                    continue;
                }
                let gone = |key: &str| {
                    op == Op::Delete
                        && !missing.is_empty()
                        && missing.contains(&MissingElement {
                            family: *family,
                            set: set.clone(),
                            key: key.to_string(),
                        })
                };
                batch.reserve(elements.len());
                batch
                    .push_set(
                        *family,
                        TABLE,
                        set,
                        &ty,
                        op,
                        elements.iter().filter(|(k, _)| !gone(k)),
                    )
                    .map_err(encode_err)?;
            }
        }
    }
    Ok((batch.elements > 0).then(|| batch.finish()))
}

#[cfg(test)]
mod tests;
