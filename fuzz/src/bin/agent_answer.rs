//! An agent's answer as the provider's sidecar reads it from the agent's connection: the head
//! (`agent_http::parse_head`), the body's framing from that head (`Framing::of`), and the body
//! taken off the bytes after the head, fed whole and split where the input says. Asserts that
//! the split does not change what is read, and that a finished body took no bytes it was not
//! framed to take.
#![no_main]

use bytes::BytesMut;
use capmesh_proxy::agent_http::{Framing, parse_head};
use libfuzzer_sys::fuzz_target;

/// The head's status and the body's bytes, with whether the body ended before the input did
/// and how many bytes were left after it; `None` where the answer is refused.
fn read(parts: &[&[u8]], head_request: bool) -> Option<(u16, Vec<u8>, bool, usize)> {
    let mut buf = BytesMut::new();
    let mut head = None;
    let mut framing = None;
    let mut body = Vec::new();
    for part in parts {
        buf.extend_from_slice(part);
        if head.is_none() {
            match parse_head(&mut buf).ok()? {
                Some(h) => {
                    framing = Some(Framing::of(&h, head_request).ok()?);
                    head = Some(h);
                }
                None => continue,
            }
        }
        let framing = framing.as_mut()?;
        while let Some(data) = framing.decode(&mut buf).ok()? {
            body.extend_from_slice(&data);
        }
    }
    let status = head?.status.as_u16();
    let mut framing = framing?;
    let done = framing.done();
    if !done {
        framing.eof().ok()?;
    }
    Some((status, body, done, buf.len()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, answer)) = data.split_first() else {
        return;
    };
    let head_request = split & 1 == 1;
    let at = usize::from(split >> 1).min(answer.len());
    let whole = read(&[answer], head_request);
    let parts = read(&[&answer[..at], &answer[at..]], head_request);
    assert_eq!(whole, parts);
    if let Some((_, body, true, _)) = &whole {
        assert!(body.len() <= answer.len());
    }
});
