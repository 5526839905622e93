//! CPU time and resident memory of a process and its descendants, from `/proc` (nginx's
//! workers are children of its master; the CPU of both counts).

use std::time::Instant;

/// The kernel's clock ticks per second (`getconf CLK_TCK`), 100 on every Linux we run on.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// `pid` and every process below it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return all;
    };
    let parents: Vec<(u32, u32)> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, stat_fields(p)?.ppid)))
        .collect();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

struct Stat {
    ppid: u32,
    ticks: u64,
}

fn stat_fields(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) … utime(11) stime(12).
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Voluntary context switches (a thread blocked: waiting for I/O or another thread) of every
/// thread of `pid` so far. Involuntary ones (preemption) depend on what else runs and are left
/// out.
pub fn switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// A CPU-time reading of some process trees.
#[derive(Debug, Clone)]
pub struct CpuSample {
    at: Instant,
    ticks: Vec<u64>,
    switches: Vec<u64>,
}

/// Watches the CPU time of a set of process trees (one per proxy instance).
#[derive(Debug, Clone)]
pub struct CpuMeter {
    roots: Vec<u32>,
    hz: f64,
}

impl CpuMeter {
    /// Meters the trees under `roots`.
    pub fn new(roots: Vec<u32>) -> Self {
        Self {
            roots,
            hz: clock_ticks(),
        }
    }

    /// The metered processes.
    pub fn roots(&self) -> &[u32] {
        &self.roots
    }

    /// Reads every tree's CPU time now.
    pub fn sample(&self) -> CpuSample {
        let trees: Vec<Vec<u32>> = self.roots.iter().map(|r| tree(*r)).collect();
        CpuSample {
            at: Instant::now(),
            ticks: trees
                .iter()
                .map(|t| {
                    t.iter()
                        .filter_map(|p| stat_fields(*p).map(|s| s.ticks))
                        .sum()
                })
                .collect(),
            switches: trees
                .iter()
                .map(|t| t.iter().map(|p| switches(*p)).sum())
                .collect(),
        }
    }

    /// Per tree: context switches between `a` and `b`.
    pub fn switches(&self, a: &CpuSample, b: &CpuSample) -> Vec<u64> {
        a.switches
            .iter()
            .zip(&b.switches)
            .map(|(x, y)| y.saturating_sub(*x))
            .collect()
    }

    /// Per tree: the share of one core used between `a` and `b` (1.0 = a whole core).
    pub fn cores(&self, a: &CpuSample, b: &CpuSample) -> Vec<f64> {
        let secs = (b.at - a.at).as_secs_f64().max(1e-6);
        a.ticks
            .iter()
            .zip(&b.ticks)
            .map(|(x, y)| y.saturating_sub(*x) as f64 / self.hz / secs)
            .collect()
    }

    /// Per tree: resident memory in KiB (the sum over the tree).
    pub fn rss_kib(&self) -> Vec<u64> {
        self.roots
            .iter()
            .map(|r| tree(*r).iter().filter_map(|p| rss_kib(*p)).sum())
            .collect()
    }
}
