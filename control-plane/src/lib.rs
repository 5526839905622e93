//! capmesh control plane: the registry of agents and capabilities, the topology stream that
//! pushes snapshots and deltas to proxies, the CA service, entities (registration trust) and the
//! authorization policy. Not built yet: see issue "Control plane" and `docs/protocol.md`.
#![forbid(unsafe_code)]
