//! Sealed ids as clients send them back: `Mcp-Session-Id` of a passthrough session, the ids of
//! a provider's requests to the client, `requestState`. Anything a client makes up opens to
//! nothing; what the mesh sealed opens to what it sealed, for its holder only.
#![no_main]

use std::sync::OnceLock;

use capmesh_proxy::seal::Sealer;
use libfuzzer_sys::fuzz_target;

fn sealer() -> &'static Sealer {
    static SEALER: OnceLock<Sealer> = OnceLock::new();
    SEALER.get_or_init(|| {
        #[allow(clippy::expect_used)]
        Sealer::from_hex(&"7a".repeat(32)).expect("a valid key")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let s = sealer();
    assert!(s.open_pinned("get_weather", text).is_none());
    assert!(s.open_route("server-request", text).is_none());
    assert!(s.open_for("session", "caller", text).is_none());
    let _ = Sealer::from_hex(text);
    if let Some(sealed) = s.seal_for("session", "caller", text) {
        assert_eq!(s.open_for("session", "caller", &sealed).as_deref(), Some(text));
        assert!(s.open_for("session", "another", &sealed).is_none());
    }
});
