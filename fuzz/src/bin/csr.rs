//! `POST /v1/certificates` as the control plane reads it: the CSR's PEM, its signature and its
//! one SPIFFE ID (`requested_identity`), then issuance by the mesh CA for that identity, which
//! re-reads the CSR. Also the serial numbers `POST /v1/revocations` takes.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use capmesh_certs::ca::requested_identity;
use capmesh_certs::{Ca, Validity};
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        #[allow(clippy::expect_used)]
        Ca::generate("capmesh.local".parse().expect("a valid trust domain"), false)
            .expect("a CA")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = capmesh_control_plane::revocations::parse_serial(text);
    if let Ok(identity) = requested_identity(text)
        && identity.trust_domain().as_str() == "capmesh.local"
    {
        let issued = ca().issue(text, &identity, Validity::for_ttl(Duration::from_secs(60)));
        assert!(issued.is_ok(), "a CSR that passed the checks was not issued: {issued:?}");
    }
});
