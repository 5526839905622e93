//! The `capmesh` command: demo, up, list, status, call, entity, token, policy, cert. Not built yet.
#![forbid(unsafe_code)]
