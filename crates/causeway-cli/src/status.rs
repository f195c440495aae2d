//! `causeway status`: every component with its pid, addresses, health, metrics address and
//! memory (resident set, and its proportional share: shared pages such as the one binary's code
//! are divided among the processes mapping them, so the shares add up to what the system uses).
//!
//! The total the memory target is judged by is the PSS sum. Every component is the same
//! executable, so each one's RSS includes the same ~16 MiB of code and libraries; adding RSS up
//! counts those pages once per process and says more about the number of processes than about
//! memory in use. Both are printed, with the private part (pages no other process shares).

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use causeway_client::plain_http;
use http::{Method, StatusCode};
use serde::Serialize;

use crate::state::{ComponentState, Phase, RunState, is_alive};

#[derive(Debug, Serialize)]
pub struct ComponentStatus {
    pub role: String,
    pub instance: String,
    pub pid: Option<u32>,
    pub listen: Option<String>,
    pub metrics: Option<String>,
    /// `up`, `down` or `starting`.
    pub health: String,
    pub restarts: u32,
    pub last_exit: Option<String>,
    pub memory: Option<Memory>,
}

/// A process's memory, from `/proc/<pid>/smaps_rollup` (Linux).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Resident set: every page mapped and in memory, shared ones counted in full.
    pub rss_bytes: u64,
    /// Proportional set: shared pages divided among the processes that map them.
    pub pss_bytes: u64,
    /// Pages this process alone maps (its heap, stacks and written data): what stopping it frees.
    pub private_bytes: u64,
}

impl Memory {
    /// Reads a live process's memory; `None` where `/proc` does not tell (not Linux, gone).
    pub fn of(pid: u32) -> Option<Self> {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        Self::parse(&rollup)
    }

    fn parse(rollup: &str) -> Option<Self> {
        let field = |name: &str| {
            rollup.lines().find_map(|line| {
                let rest = line.strip_prefix(name)?.strip_prefix(':')?;
                let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
                Some(kib * 1024)
            })
        };
        Some(Self {
            rss_bytes: field("Rss")?,
            pss_bytes: field("Pss")?,
            private_bytes: field("Private_Clean")? + field("Private_Dirty")?,
        })
    }

    fn add(self, other: Self) -> Self {
        Self {
            rss_bytes: self.rss_bytes + other.rss_bytes,
            pss_bytes: self.pss_bytes + other.pss_bytes,
            private_bytes: self.private_bytes + other.private_bytes,
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub running: bool,
    pub supervisor_pid: u32,
    pub data_dir: String,
    pub edge: Option<String>,
    pub components: Vec<ComponentStatus>,
    /// The supervisor's own memory.
    pub supervisor_memory: Option<Memory>,
    /// The supervisor's and every running component's, added up.
    pub total_memory: Memory,
}

/// Probes each component's `/healthz`.
pub async fn collect(data_dir: &Path) -> anyhow::Result<Status> {
    let state = RunState::load(data_dir)?;
    let running = is_alive(state.supervisor_pid);
    let probes = state
        .components
        .iter()
        .map(|component| probe(component, running));
    let components = futures_util::future::join_all(probes).await;
    let supervisor_memory = running.then(|| Memory::of(state.supervisor_pid)).flatten();
    let total_memory = components
        .iter()
        .filter_map(|component| component.memory)
        .chain(supervisor_memory)
        .fold(Memory::default(), Memory::add);
    Ok(Status {
        running,
        supervisor_pid: state.supervisor_pid,
        data_dir: state.data_dir.display().to_string(),
        edge: state.edge.map(|edge| edge.to_string()),
        components,
        supervisor_memory,
        total_memory,
    })
}

async fn probe(component: &ComponentState, supervisor_alive: bool) -> ComponentStatus {
    let alive = supervisor_alive && component.pid.is_some_and(is_alive);
    let healthy = match (alive, component.admin) {
        (true, Some(admin)) => matches!(
            plain_http::request(
                Method::GET,
                admin,
                "/healthz",
                None,
                Duration::from_millis(800)
            )
            .await,
            Ok((StatusCode::OK, _))
        ),
        _ => false,
    };
    let health = match (&component.phase, healthy) {
        (_, true) => "up",
        (Phase::Starting, false) => "starting",
        _ => "down",
    };
    let pid = component.pid.filter(|_| alive);
    ComponentStatus {
        role: component.role.name().to_string(),
        instance: component.instance.clone(),
        pid,
        memory: pid.and_then(Memory::of),
        listen: component.listen.map(|a| a.to_string()),
        metrics: component.admin.map(|a| format!("http://{a}/metrics")),
        health: health.to_string(),
        restarts: component.restarts,
        last_exit: component.last_exit.clone(),
    }
}

pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "causeway {} (supervisor pid {}, data dir {})",
        if status.running {
            "running"
        } else {
            "NOT running (stale state)"
        },
        status.supervisor_pid,
        status.data_dir
    );
    if let Some(edge) = &status.edge {
        let _ = writeln!(out, "edge: {edge}");
    }
    let rows = status.components.iter().map(|c| {
        let health = match (&c.last_exit, c.health.as_str()) {
            (Some(exit), "down") => format!("down (last exit: {exit})"),
            (_, health) => health.to_string(),
        };
        vec![
            c.role.clone(),
            c.instance.clone(),
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.listen.clone().unwrap_or_else(|| "-".into()),
            c.restarts.to_string(),
            c.metrics.clone().unwrap_or_else(|| "-".into()),
            c.memory
                .map(|m| mib(m.rss_bytes))
                .unwrap_or_else(|| "-".into()),
            c.memory
                .map(|m| mib(m.pss_bytes))
                .unwrap_or_else(|| "-".into()),
            health,
        ]
    });
    out.push_str(&table(
        &[
            "COMPONENT",
            "INSTANCE",
            "PID",
            "ADDRESS",
            "RESTARTS",
            "METRICS",
            "RSS",
            "PSS",
            "HEALTH",
        ],
        rows,
    ));
    let supervisor = status
        .supervisor_memory
        .map(|m| format!(" (supervisor: {} RSS)", mib(m.rss_bytes)))
        .unwrap_or_default();
    let total = status.total_memory;
    let _ = writeln!(
        out,
        "memory in use: {} PSS in all, {} of it private to one process{supervisor}\n\
         (RSS added up: {}, which counts the shared code of the one binary once per process)",
        mib(total.pss_bytes),
        mib(total.private_bytes),
        mib(total.rss_bytes),
    );
    out
}

/// The table `causeway up` prints once everything is ready.
pub fn ready_table(state: &RunState) -> String {
    let rows = state.components.iter().map(|c| {
        vec![
            c.role.name().to_string(),
            c.instance.clone(),
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.listen
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            c.admin
                .map(|a| format!("http://{a}/metrics"))
                .unwrap_or_else(|| "-".into()),
            if c.phase == Phase::Running {
                "yes"
            } else {
                "no"
            }
            .to_string(),
        ]
    });
    table(
        &[
            "COMPONENT",
            "INSTANCE",
            "PID",
            "ADDRESS",
            "METRICS",
            "READY",
        ],
        rows,
    )
}

/// Left-aligned columns as wide as their widest cell.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    lines.extend(rows);
    let mut widths = vec![0; header.len()];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_smaps_rollup() {
        let rollup = "55d0c8a2b000-7ffd5e1f3000 ---p 00000000 00:00 0    [rollup]\n\
                      Rss:               12345 kB\n\
                      Pss:                6789 kB\n\
                      Pss_Anon:           4000 kB\n\
                      Shared_Clean:       5000 kB\n\
                      Private_Clean:        12 kB\n\
                      Private_Dirty:      1440 kB\n";
        assert_eq!(
            Memory::parse(rollup),
            Some(Memory {
                rss_bytes: 12345 * 1024,
                pss_bytes: 6789 * 1024,
                private_bytes: (12 + 1440) * 1024,
            })
        );
        assert_eq!(Memory::parse("Rss: lots\n"), None);
        // This process is alive: its own numbers are there, and its share is within its set.
        let own = Memory::of(std::process::id()).expect("Linux /proc");
        assert!(
            own.rss_bytes > 0
                && own.pss_bytes <= own.rss_bytes
                && own.private_bytes <= own.pss_bytes,
            "{own:?}"
        );
    }

    #[test]
    fn table_aligns_columns_to_the_widest_cell() {
        let text = table(
            &["A", "BB"],
            vec![vec!["long cell".to_string(), "x".to_string()]].into_iter(),
        );
        assert_eq!(text, "A          BB\nlong cell  x\n");
    }
}
