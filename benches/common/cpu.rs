//! CPU time from `/proc`: a process tree's (live descendants plus the reaped ones' time), a service's by the pid
//! `scripts/services` recorded, and this process' threads by name (a runtime whose threads are named apart).
#![allow(dead_code)] // each bench uses a part

use std::collections::HashMap;
use std::process::Command;

/// Clock ticks per second.
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (ppid, own utime+stime, reaped children's cutime+cstime) in ticks, from a `stat` file's text.
fn parse_stat(s: &str) -> Option<(u32, u64, u64)> {
    // fields after the command name (which may hold spaces): state ppid ... utime(14) stime cutime cstime
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

/// (ppid, own utime+stime, reaped children's cutime+cstime) of a process in ticks.
pub fn proc_stat(pid: u32) -> Option<(u32, u64, u64)> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU ticks of a process and all its descendants, including those already reaped (their time is in the
/// parents' cutime/cstime).
pub fn tree_ticks(root: u32) -> u64 {
    let mut stats: HashMap<u32, (u32, u64, u64)> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(st) = proc_stat(pid)
            {
                stats.insert(pid, st);
            }
        }
    }
    let mut total = 0;
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if let Some(&(_, own, reaped)) = stats.get(&p) {
            total += own + reaped;
            todo.extend(stats.iter().filter(|(_, s)| s.0 == p).map(|(c, _)| *c));
        }
    }
    total
}

/// A service's pid recorded by `scripts/services`, when it is running.
pub fn service_pid(name: &str) -> Option<u32> {
    let dir = std::env::var("RECAP_SERVICES_DIR").ok()?;
    let pid = std::fs::read_to_string(format!("{dir}/{name}.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    proc_stat(pid).map(|_| pid)
}

/// CPU ticks of this process' threads whose name starts with `prefix` (live threads only).
pub fn thread_ticks(prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .filter_map(|e| parse_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?))
        .map(|s| s.1)
        .sum()
}
