//! What a proxy costs, read from /proc: CPU time (utime + stime from
//! `/proc/<pid>/stat`) and resident memory (`VmRSS` from
//! `/proc/<pid>/status`), for a process together with its children, so
//! that nginx's master and workers count as one proxy. Also the machine's
//! busy share from `/proc/stat`, which shows whether the run was CPU-bound.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One side of a peer: a process and everything it forked.
#[derive(Debug, Clone)]
pub struct ProcGroup {
    pub label: String,
    pub root: u32,
}

impl ProcGroup {
    pub fn new(label: impl Into<String>, root: u32) -> Self {
        ProcGroup {
            label: label.into(),
            root,
        }
    }

    /// The root and its descendants alive now.
    pub fn pids(&self) -> Vec<u32> {
        let mut all = vec![self.root];
        let parents = parent_map();
        let mut i = 0;
        while i < all.len() {
            let p = all[i];
            all.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
            i += 1;
        }
        all
    }

    /// Resident memory of the group, in bytes: the sum of each process's
    /// VmRSS (pages shared between nginx's master and workers count once
    /// per process, as `ps` shows them).
    pub fn rss(&self) -> u64 {
        rss_sum(&self.pids())
    }
}

fn rss_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&p| rss_of(p)).sum()
}

/// CPU time used so far by these processes, in seconds.
fn cpu_sum(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_of(p)).sum()
}

/// (pid, ppid) of every process.
fn parent_map() -> Vec<(u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat_fields(pid)?.get(1)?.parse().ok()?)))
        .collect()
}

/// The fields of `/proc/<pid>/stat` after the command name: state first.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

fn cpu_of(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// The file-backed part of the group's RSS (`RssFile`: program text and
/// libraries), in bytes; the rest is the proxy's own memory.
pub fn rss_file(group: &ProcGroup) -> u64 {
    group
        .pids()
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("RssFile:"))?;
            Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
        })
        .sum()
}

pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// (busy, total) jiffies of all CPUs.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are the 4th and 5th.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU seconds used so far by every process outside this program's own
/// tree (the bench and everything it started), by pid: other users of the
/// machine, whose work would otherwise pass for the proxies' cost. Kernel
/// threads are left out, since they also work on the bench's behalf.
fn foreign_snapshot() -> HashMap<u32, f64> {
    let parents = parent_map();
    let mut mine: HashSet<u32> = HashSet::from([std::process::id()]);
    // Parents usually have lower pids, but not always; repeat until stable.
    loop {
        let before = mine.len();
        for (pid, ppid) in &parents {
            if mine.contains(ppid) {
                mine.insert(*pid);
            }
        }
        if mine.len() == before {
            break;
        }
    }
    parents
        .iter()
        .filter(|(pid, ppid)| !mine.contains(pid) && *ppid != 2 && *pid != 2)
        .filter_map(|(pid, _)| Some((*pid, cpu_of(*pid)?)))
        .collect()
}

/// Cores used by other processes between two snapshots. A process that
/// started in between counts from zero; one that ended is missed.
fn foreign_cores(before: &HashMap<u32, f64>, after: &HashMap<u32, f64>, wall: f64) -> f64 {
    let used: f64 = after
        .iter()
        .map(|(pid, t)| (t - before.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum();
    used / wall
}

/// Waits, at most `max`, until other processes use less than `cores` over
/// one second. Returns what they used in the last second.
pub fn wait_quiet(max: Duration, cores: f64) -> f64 {
    let give_up = Instant::now() + max;
    loop {
        let before = foreign_snapshot();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(1));
        let used = foreign_cores(&before, &foreign_snapshot(), t.elapsed().as_secs_f64());
        if used < cores || Instant::now() >= give_up {
            return used;
        }
    }
}

/// What one group cost during a measured run.
#[derive(Debug, Clone)]
pub struct Usage {
    pub label: String,
    /// CPU seconds per wall second: 1.0 is one core busy.
    pub cpu_cores: f64,
    /// Highest RSS seen while sampling every 100 ms, in bytes.
    pub peak_rss: u64,
}

/// The cost of a run: per group, and the machine's busy share (0..1 of all
/// cores).
#[derive(Debug, Clone, Default)]
pub struct Costs {
    pub groups: Vec<Usage>,
    pub machine_busy: f64,
    /// Cores used meanwhile by processes that are not part of the bench.
    pub foreign_cores: f64,
}

impl Costs {
    pub fn get(&self, label: &str) -> Option<&Usage> {
        self.groups.iter().find(|u| u.label == label)
    }
}

/// Runs `f` while sampling the groups' RSS, and reports the CPU they used.
/// The groups' processes are listed once, before `f` starts: proxies do
/// not fork while they run.
pub fn during<T>(groups: &[ProcGroup], f: impl FnOnce() -> T) -> (T, Costs) {
    let pids: Vec<Vec<u32>> = groups.iter().map(ProcGroup::pids).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = Arc::new(Mutex::new(vec![0u64; groups.len()]));
    let sampler = {
        let (stop, peaks, pids) = (stop.clone(), peaks.clone(), pids.clone());
        std::thread::spawn(move || {
            // Bounded: the runner stops it, and no run is longer than this.
            let give_up = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                for (i, set) in pids.iter().enumerate() {
                    let rss = rss_sum(set);
                    let mut p = peaks.lock().unwrap();
                    p[i] = p[i].max(rss);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_sum(p)).collect();
    let foreign0 = foreign_snapshot();
    let (busy0, total0) = machine_jiffies();
    let t0 = Instant::now();
    let out = f();
    let wall = t0.elapsed().as_secs_f64();
    let (busy1, total1) = machine_jiffies();
    let foreign_cores = foreign_cores(&foreign0, &foreign_snapshot(), wall);
    let cpu1: Vec<f64> = pids.iter().map(|p| cpu_sum(p)).collect();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let peaks = peaks.lock().unwrap().clone();
    let usage = groups
        .iter()
        .enumerate()
        .map(|(i, g)| Usage {
            label: g.label.clone(),
            cpu_cores: (cpu1[i] - cpu0[i]) / wall,
            peak_rss: peaks[i].max(rss_sum(&pids[i])),
        })
        .collect();
    let machine_busy = if total1 > total0 {
        (busy1 - busy0) as f64 / (total1 - total0) as f64
    } else {
        0.0
    };
    (
        out,
        Costs {
            groups: usage,
            machine_busy,
            foreign_cores,
        },
    )
}
