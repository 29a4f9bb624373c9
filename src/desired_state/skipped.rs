//! [`Skipped`]: one piece of invalid input that the builder left out.
//!
//! Upstream kube-proxy mostly trusts API-server validation and logs (or panics on) the rare
//! object that slips through. kproxy also reads hand-written manifests, so every rejected field
//! is reported with its path, and the rest of the object keeps working where that is sensible.

use std::fmt;

use crate::cache::ObjectKey;

/// One invalid piece of input that was skipped, logged once by the caller.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Skipped {
    /// `"Service"` or `"EndpointSlice"`.
    pub kind: &'static str,
    /// The object the field belongs to.
    pub object: ObjectKey,
    /// The field path, e.g. `spec.ports[1].port`.
    pub field: String,
    /// What is wrong and what was skipped, e.g. `0 is not a valid port (1-65535); port skipped`.
    pub reason: String,
}

impl Skipped {
    /// A skipped field of a Service.
    pub fn service(
        object: &ObjectKey,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            kind: "Service",
            object: object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A skipped field of an EndpointSlice.
    pub fn slice(object: &ObjectKey, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            kind: "EndpointSlice",
            object: object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Skipped {
    /// `Service default/web: spec.ports[1].port: 0 is not a valid port (1-65535); port skipped`.
    /// The object's name is escaped: a hand-written one may hold newlines or control
    /// characters, which must not forge log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}: {}",
            self.kind,
            self.object.to_string().escape_debug(),
            self.field,
            self.reason
        )
    }
}
