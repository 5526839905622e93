//! Wire types shared by the capmesh proxy, control plane and CLI.
//!
//! This crate owns the *shape* of what crosses process boundaries — names, registrations, the
//! topology stream's frames, REST bodies — and the rules for reading them (tag selectors, version
//! constraints, authorization policy). It does no I/O.
#![forbid(unsafe_code)]
// Tests may unwrap: a panic there is a failed assertion. The library build is still linted.

pub mod dependency;
pub mod duration;
pub mod flag;
pub mod names;
pub mod policy;
pub mod registration;
pub mod rest;
pub mod selector;
pub mod settings;
pub mod snapshot;
pub mod stream;
pub mod trace;
pub mod version;

pub use dependency::{Dependency, DependencyTarget};
pub use flag::FlagError;
pub use names::{AgentName, Capability, NameError, Namespace, Tag, TrustDomain};
pub use policy::{
    Policy, PolicyAction, PolicyDefault, PolicyError, PolicyRule, ProvideRule, UNAUTHENTICATED,
    glob_match,
};
pub use registration::{CapabilityOverride, Registration, ToolSpec};
pub use rest::{
    AgentInfo, CapabilityInfo, CertificateRequest, CertificateResponse, Entity, EntityRequest,
    ErrorBody, InstanceInfo, RefusedCapability, Revocation, RevocationRequest, TokenCreated,
    TokenInfo, TokenRequest,
};
pub use selector::{Selector, SelectorError, TagRule};
pub use settings::{SettingsError, parse_propagated_header};
pub use snapshot::{
    Delta, DeltaError, Endpoint, EndpointId, EntityTrust, MeshSettings, Snapshot, SnapshotVersion,
    TrustBundle,
};
pub use stream::{
    ControlFrame, FrameError, Hello, MAX_FRAME_BYTES, Node, ProxyFrame, decode_frame, encode_frame,
};
pub use trace::{
    AttributeValue, EdgeTraffic, SpanKind, SpanRecord, StoredSpan, Trace, TraceSummary, Traffic,
};
pub use version::{VersionError, parse_version, parse_version_req};
