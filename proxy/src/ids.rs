//! Unpredictable ids without a system call per id: each thread seeds a 256-bit secret from the
//! operating system once and derives ids as SHA-256(secret ‖ counter), a pseudo-random
//! function in counter mode. The mesh's per-call ids (`cm-…`) and session ids come from here;
//! asking the kernel for each (`getrandom`) showed in the request path's profile. Each
//! 32-byte block is served out in turn (a call's id takes 12 bytes), and bytes are wiped once
//! handed out, so one SHA-256 serves two or three calls.

use std::cell::RefCell;

use ring::digest::{Context, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

struct Generator {
    secret: [u8; 32],
    counter: u64,
    /// The current block; its last `left` bytes are not handed out yet.
    block: [u8; 32],
    left: usize,
}

impl Generator {
    fn new() -> Self {
        let mut secret = [0u8; 32];
        if SystemRandom::new().fill(&mut secret).is_err() {
            // getrandom never fails on Linux; fall back to the clock and the thread rather than
            // to a constant, so ids at least stay distinct.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            secret[..16].copy_from_slice(&t.to_le_bytes());
        }
        Self {
            secret,
            counter: 0,
            block: [0; 32],
            left: 0,
        }
    }

    fn fill(&mut self, mut out: &mut [u8]) {
        while !out.is_empty() {
            if self.left == 0 {
                self.counter = self.counter.wrapping_add(1);
                let mut ctx = Context::new(&SHA256);
                ctx.update(&self.secret);
                ctx.update(&self.counter.to_le_bytes());
                self.block.copy_from_slice(ctx.finish().as_ref());
                self.left = self.block.len();
            }
            let at = self.block.len() - self.left;
            let n = self.left.min(out.len());
            let (now, rest) = out.split_at_mut(n);
            now.copy_from_slice(&self.block[at..at + n]);
            self.block[at..at + n].fill(0);
            self.left -= n;
            out = rest;
        }
    }
}

thread_local! {
    static GENERATOR: RefCell<Generator> = RefCell::new(Generator::new());
}

/// `bytes` unpredictable bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2);
    push_random_hex(&mut out, bytes);
    out
}

/// Appends `bytes` unpredictable bytes to `out` as lowercase hex, so that an id with a prefix
/// is built in one allocation.
pub fn push_random_hex(out: &mut String, bytes: usize) {
    let mut raw = [0u8; 32];
    let mut digits = [0u8; 64];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(raw.len());
        GENERATOR.with(|g| g.borrow_mut().fill(&mut raw[..n]));
        hex_into(&raw[..n], &mut digits);
        // Hex digits are ASCII, so this never falls back to the empty string.
        out.push_str(std::str::from_utf8(&digits[..2 * n]).unwrap_or_default());
        left -= n;
    }
}

/// Writes `bytes` into `out` as lowercase hex, two digits a byte, from its start; digits that
/// do not fit are dropped, and the rest of `out` is left as it was.
pub fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// `N` bytes from exactly `2 × N` hex digits (either case); `None` for anything else. The
/// reverse of [`hex_into`].
pub fn hex_from<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    fn nibble(d: u8) -> Option<u8> {
        match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'a'..=b'f' => Some(d - b'a' + 10),
            b'A'..=b'F' => Some(d - b'A' + 10),
            _ => None,
        }
    }
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_of_the_asked_length_and_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = random_hex(12);
            assert_eq!(id.len(), 24);
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert!(seen.insert(id));
        }
        assert_eq!(random_hex(40).len(), 80);
        assert_eq!(random_hex(70).len(), 140);
        assert_eq!(random_hex(0), "");
    }

    #[test]
    fn threads_do_not_share_a_sequence() {
        let a = std::thread::spawn(|| random_hex(16))
            .join()
            .unwrap_or_default();
        let b = std::thread::spawn(|| random_hex(16))
            .join()
            .unwrap_or_default();
        assert_ne!(a, b);
    }

    #[test]
    fn hex_from_reads_exactly_two_digits_a_byte() {
        let mut digits = [0u8; 8];
        hex_into(&[0x00, 0xab, 0x7f, 0xff], &mut digits);
        assert_eq!(hex_from::<4>(&digits), Some([0x00, 0xab, 0x7f, 0xff]));
        assert_eq!(hex_from::<2>(b"AbcD"), Some([0xab, 0xcd]));
        for bad in [&b"abc"[..], b"abcdef", b"+1ab", b"g0ab", b" 1ab"] {
            assert_eq!(hex_from::<2>(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn hex_into_writes_two_lowercase_digits_a_byte_and_nothing_past_them() {
        let mut out = *b"xxxxxxxx";
        hex_into(&[0x00, 0xaf, 0x5c], &mut out);
        assert_eq!(&out, b"00af5cxx");
        let mut short = *b"___";
        hex_into(&[0xff, 0x01], &mut short);
        assert_eq!(&short, b"ff_");
    }
}
