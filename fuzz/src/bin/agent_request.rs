//! An agent's requests as the consumer's sidecar reads them on its outbound listener:
//! `serve::h1::parse`, which takes each request head it serves itself off the bytes read and
//! leaves anything else for hyper. The input is fed whole and split where its first byte says.
//! Asserts that the split does not change what is read, that a head taken off took exactly its
//! bytes (the rest stays, for the body and the next request), that one left for hyper is left
//! untouched, and that a body length over the limit is never served here.
#![no_main]

use bytes::BytesMut;
use capmesh_proxy::serve::h1::{Parsed, parse};
use libfuzzer_sys::fuzz_target;

/// The body limit the fuzzing runs with.
const MAX_BODY: usize = 1000;

/// What is read of `parts`: each head served here (its target, fields and body length, and
/// whether it asked to close), whether the rest was left to hyper, and the bytes left.
fn read(parts: &[&[u8]]) -> (Vec<String>, bool, Vec<u8>) {
    let mut buf = BytesMut::new();
    let mut heads = Vec::new();
    // Body bytes still to come, and whether the connection went to hyper.
    let mut owed = 0;
    let mut handed = false;
    for part in parts {
        buf.extend_from_slice(part);
        if handed {
            continue;
        }
        let body = owed.min(buf.len());
        let _ = buf.split_to(body);
        owed -= body;
        while owed == 0 {
            let before = buf.clone();
            match parse(&mut buf, MAX_BODY) {
                Parsed::Partial => {
                    assert_eq!(buf, before, "a partial head took bytes");
                    break;
                }
                Parsed::Other => {
                    assert_eq!(buf, before, "a head left for hyper was changed");
                    handed = true;
                    break;
                }
                Parsed::Request(head) => {
                    assert!(head.length <= MAX_BODY);
                    assert!(before.ends_with(&buf), "the head taken off was not the front");
                    assert!(buf.len() < before.len(), "a head took no bytes");
                    heads.push(format!(
                        "{} {:?} {} {}",
                        head.uri, head.headers, head.length, head.close
                    ));
                    let body = head.length.min(buf.len());
                    let _ = buf.split_to(body);
                    owed = head.length - body;
                }
            }
        }
    }
    heads.push(format!("owed {owed}"));
    (heads, handed, buf.to_vec())
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let at = usize::from(split).min(input.len());
    let whole = read(&[input]);
    let parts = read(&[&input[..at], &input[at..]]);
    assert_eq!(whole, parts);
});
