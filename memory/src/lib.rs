//! Returning the heap memory a process has freed to the operating system.
//!
//! glibc's allocator keeps what a process frees for its next allocations, and gives back only
//! the free space at the very top of the main heap. A proxy's working set rises and falls with
//! its open connections (about 20 KiB each for an HTTP/1 client connection: buffers, the
//! connection's task, its TLS or HTTP state), so after a burst of connections its resident
//! memory stays at the burst's high-water mark although the memory is free. [`release`] asks
//! the allocator to hand every whole free page back, in every arena, and [`release_every`]
//! does so periodically, as Envoy does with its allocator's `memory_release_interval`
//! (benches/RESULTS.md, "Soak").
//!
//! This crate holds capmesh's one `unsafe` block, the call into the C library; every other
//! crate forbids unsafe code.
#![deny(unsafe_code)]

use std::time::Duration;

/// How often [`release_every`] runs in the capmesh binaries.
pub const RELEASE_INTERVAL: Duration = Duration::from_secs(10);

/// Hands the allocator's free memory back to the operating system: the free top of each
/// heap, and every whole free page inside it (glibc's `malloc_trim(0)`). True when some
/// memory went back. On a C library other than glibc it does nothing and returns false.
pub fn release() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointer and touches only the allocator's own state,
        // under the allocator's locks (glibc documents it MT-Safe), so it is sound to call from
        // any thread at any time.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Calls [`release`] every `interval`, forever: spawn it on the process's runtime.
pub async fn release_every(interval: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory freed after a burst of allocations is returned: the process's resident set falls
    /// back after `release`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_goes_back_to_the_system() {
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        }
        // 4,096 blocks of 16 KiB (below the size glibc serves with mmap), touched so they
        // are resident, each followed by a small block that stays: the freed space is never
        // the heap's free top, which glibc would give back by itself.
        let mut blocks = Vec::with_capacity(4096);
        let mut kept = Vec::with_capacity(4096);
        for i in 0..4096 {
            blocks.push(vec![i as u8; 16 * 1024]);
            kept.push(vec![i as u8; 64]);
        }
        let before = rss_kib();
        blocks.clear();
        let freed = rss_kib();
        assert!(release(), "malloc_trim released nothing");
        let after = rss_kib();
        drop(kept);
        // 64 MiB were touched; at least half of them must leave the resident set.
        assert!(
            after + 32 * 1024 < before.max(freed),
            "resident set {before} KiB with the blocks, {freed} KiB after freeing them, {after} KiB after release"
        );
    }
}
