//! The admission webhook's `POST /inject` body: an AdmissionReview as the Kubernetes API server
//! sends it (or anything else), answered by `webhook::review` with a patch or a refusal.
#![no_main]

use std::sync::OnceLock;

use capmesh_control_plane::inject::InjectConfig;
use capmesh_control_plane::webhook::review;
use libfuzzer_sys::fuzz_target;

fn config() -> &'static InjectConfig {
    static CONFIG: OnceLock<InjectConfig> = OnceLock::new();
    #[allow(clippy::expect_used)]
    CONFIG.get_or_init(|| {
        InjectConfig::new("capmesh.local".parse().expect("a valid trust domain"))
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = review(data, config());
});
