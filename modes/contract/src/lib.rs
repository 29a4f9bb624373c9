//! The contract between kproxy's control plane and its data-plane modes.
//!
//! Data flow: the control plane turns Services, EndpointSlices and the Node into one immutable
//! [`ProxyState`], in which every Kubernetes decision is already made (traffic policies,
//! terminating-endpoint fallback, topology, which endpoints are local). A [`Mode`] renders that
//! state into its own kernel vocabulary, reads what the kernel holds, plans the difference as one
//! printable value and applies it atomically. A mode never sees a Kubernetes object; the control
//! plane never sees a rule.
//!
//! Start with [`ProxyState`] and [`Mode`].
#![warn(missing_docs)]

pub mod clock;
pub mod command;
mod error;
mod local;
mod mode;
mod state;

pub use error::{Cause, Chain, ModeError};
pub use local::{
    InvalidInterfaceName, LocalMatch, LocalTraffic, MAX_INTERFACE_NAME, check_interface_name,
};
pub use mode::{Mode, ModeName, ObjectCount, Plan, PlanStats, UnknownMode};
pub use state::{
    Endpoint, Endpoints, IpFamily, NodePortAddresses, NodeSettings, Protocol, ProxyState,
    ServicePort, ServicePortKey, ServicePortName, SessionAffinity, TrafficPolicy,
};
