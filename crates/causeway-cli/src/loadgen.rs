//! A closed-loop load generator for `causeway bench`: `concurrency` workers each send a request,
//! wait for the answer, and send the next, for a fixed time after a warm-up. Latencies are kept
//! whole (one `u32` of microseconds per request), so percentiles are exact, not bucketed.
//!
//! Workloads compared with each other can be measured in rounds ([`run_in_rounds`]): each takes
//! its turn for a slice of its time, in an order that rotates, and its slices are merged. On a
//! shared machine, drift (another process, a CPU's clock, a cache that whichever ran first
//! warmed) then falls on all of them alike instead of on whichever ran in that stretch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one workload measured.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    /// CPU the measured servers used per request, where it could be read.
    pub server_cpu_per_request: Option<Duration>,
    /// CPU the callers used per request (the workers here and the client code under them),
    /// where it could be read.
    pub client_cpu_per_request: Option<Duration>,
    /// Requests per second in each measured turn, in order (one entry unless run in rounds).
    pub turn_rates: Vec<f64>,
}

impl LoadReport {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Where a workload's CPU time is read, each as the total used so far: by whatever serves it,
/// and by the callers. `None` where it cannot be told apart.
#[derive(Clone, Copy)]
pub struct CpuMeters<'a> {
    pub server: &'a (dyn Fn() -> Option<Duration> + Sync),
    pub client: &'a (dyn Fn() -> Option<Duration> + Sync),
}

#[derive(Clone, Copy, Debug)]
pub struct LoadShape {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What measured windows of one workload saw, kept raw so that windows can be merged.
#[derive(Debug, Default)]
struct Sample {
    /// Microseconds per successful request, unsorted.
    latencies: Vec<u32>,
    errors: u64,
    elapsed: Duration,
    server_cpu: Option<Duration>,
    client_cpu: Option<Duration>,
    /// Requests per second of each window merged in.
    turn_rates: Vec<f64>,
}

impl Sample {
    /// Nothing measured yet, to merge windows into: zero CPU until a window cannot read it.
    fn accumulator() -> Self {
        Sample {
            server_cpu: Some(Duration::ZERO),
            client_cpu: Some(Duration::ZERO),
            ..Sample::default()
        }
    }

    /// Adds another window's measurements; a CPU figure stays only if every window had one.
    fn merge(&mut self, mut other: Sample) {
        self.turn_rates.append(&mut other.turn_rates);
        self.latencies.append(&mut other.latencies);
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        let add = |mine: Option<Duration>, theirs: Option<Duration>| Some(mine? + theirs?);
        self.server_cpu = add(self.server_cpu, other.server_cpu);
        self.client_cpu = add(self.client_cpu, other.client_cpu);
    }

    fn into_report(mut self, name: &str) -> LoadReport {
        self.latencies.sort_unstable();
        let requests = self.latencies.len() as u64;
        let per_request = |cpu: Option<Duration>| match cpu {
            Some(cpu) if requests > 0 => Some(cpu / u32::try_from(requests).unwrap_or(u32::MAX)),
            _ => None,
        };
        LoadReport {
            name: name.to_string(),
            requests,
            errors: self.errors,
            elapsed: self.elapsed,
            p50: percentile(&self.latencies, 50.0),
            p99: percentile(&self.latencies, 99.0),
            server_cpu_per_request: per_request(self.server_cpu),
            client_cpu_per_request: per_request(self.client_cpu),
            turn_rates: self.turn_rates,
        }
    }
}

/// Runs `call` from `shape.concurrency` workers; the CPU `cpu` reads over the measured time is
/// charged per request.
pub async fn run<F, Fut, E>(name: &str, shape: LoadShape, cpu: CpuMeters<'_>, call: F) -> LoadReport
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    warm_up(shape.concurrency, shape.warmup, &call).await;
    measure(name, shape.concurrency, shape.duration, cpu, &call)
        .await
        .into_report(name)
}

type BoxedCall =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A named workload for [`run_in_rounds`]: its calls are type-erased so that differently built
/// clients can take turns.
pub struct Workload {
    name: String,
    call: BoxedCall,
}

impl Workload {
    pub fn new<F, Fut, E>(name: impl Into<String>, call: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let call: BoxedCall = Arc::new(move || {
            let call = call();
            Box::pin(async move { call.await.map_err(|err| err.to_string()) })
        });
        Workload {
            name: name.into(),
            call,
        }
    }
}

/// Measures `workloads` in `rounds` turns each of `shape.duration / rounds`, the order rotating
/// by one each round so that every workload leads as often as any other. Each workload warms up
/// for `shape.warmup` before its first turn and for a `rounds`th of that before each later one.
/// Reports come back in the order of `workloads`, each from all its turns merged.
pub async fn run_in_rounds(
    workloads: &[Workload],
    shape: LoadShape,
    rounds: u32,
    cpu: CpuMeters<'_>,
) -> Vec<LoadReport> {
    let rounds = rounds.max(1);
    let turn = shape.duration / rounds;
    let mut samples: Vec<Sample> = workloads.iter().map(|_| Sample::accumulator()).collect();
    for round in 0..rounds as usize {
        for offset in 0..workloads.len() {
            let index = (round + offset) % workloads.len();
            let workload = &workloads[index];
            let call = {
                let call = workload.call.clone();
                move || call()
            };
            let warmup = if round == 0 {
                shape.warmup
            } else {
                shape.warmup / rounds
            };
            warm_up(shape.concurrency, warmup, &call).await;
            let sample = measure(&workload.name, shape.concurrency, turn, cpu, &call).await;
            samples[index].merge(sample);
        }
    }
    samples
        .into_iter()
        .zip(workloads)
        .map(|(sample, workload)| sample.into_report(&workload.name))
        .collect()
}

async fn warm_up<F, Fut, E>(concurrency: usize, duration: Duration, call: &F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
{
    let warm_until = Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                while Instant::now() < warm_until {
                    let _ = call().await;
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
}

/// One measured window: `concurrency` workers calling for `duration`, with `cpu` read at its
/// edges.
async fn measure<F, Fut, E>(
    name: &str,
    concurrency: usize,
    duration: Duration,
    cpu: CpuMeters<'_>,
    call: &F,
) -> Sample
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let server_before = (cpu.server)();
    let client_before = (cpu.client)();
    let started = Instant::now();
    let until = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(4096);
                let mut errors = 0u64;
                let mut first_error = None;
                while Instant::now() < until {
                    let sent = Instant::now();
                    match call().await {
                        Ok(()) => latencies
                            .push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX)),
                        Err(err) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| err.to_string());
                        }
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut sample = Sample::default();
    for worker in workers {
        if let Ok((mut worker_latencies, worker_errors, first_error)) = worker.await {
            sample.latencies.append(&mut worker_latencies);
            sample.errors += worker_errors;
            if let Some(err) = first_error {
                tracing::warn!(workload = name, error = %err, "requests failed during the benchmark");
            }
        }
    }
    sample.elapsed = started.elapsed();
    sample
        .turn_rates
        .push(sample.latencies.len() as f64 / sample.elapsed.as_secs_f64().max(f64::EPSILON));
    let used = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    sample.server_cpu = used(server_before, (cpu.server)());
    sample.client_cpu = used(client_before, (cpu.client)());
    sample
}

/// The `p`th percentile of sorted microsecond latencies (nearest rank).
pub fn percentile(sorted_micros: &[u32], p: f64) -> Duration {
    if sorted_micros.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted_micros.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_micros.len()) - 1;
    Duration::from_micros(u64::from(sorted_micros[index]))
}

/// Clock ticks per second: 100 on every Linux this runs on (sysconf(_SC_CLK_TCK)).
const TICKS_PER_SECOND: u64 = 100;

/// The name and user plus system CPU ticks in a `/proc/.../stat` file.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (before_name_end, after_name) = stat.rsplit_once(')')?;
    let name = before_name_end.split_once('(')?.1.to_string();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3 of stat(5); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// User plus system CPU time of the given processes, from `/proc/<pid>/stat` (Linux).
pub fn cpu_time(pids: &[u32]) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    let mut ticks = 0;
    for pid in pids {
        ticks += stat_ticks(&format!("/proc/{pid}/stat"))?.1;
    }
    Some(ticks_to_duration(ticks))
}

/// CPU time of this process's threads whose names start with one of `prefixes`.
pub fn thread_cpu_time(prefixes: &[&str]) -> Option<Duration> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let ticks = tasks
        .filter_map(Result::ok)
        .filter_map(|task| stat_ticks(&format!("{}/stat", task.path().display())))
        .filter(|(name, _)| prefixes.iter().any(|prefix| name.starts_with(prefix)))
        .map(|(_, ticks)| ticks)
        .sum();
    Some(ticks_to_duration(ticks))
}

/// A side-by-side table of workloads, with each one's throughput relative to the first.
pub fn render(reports: &[LoadReport]) -> String {
    let base = reports.first().map(LoadReport::per_second).unwrap_or(1.0);
    let mut out = format!(
        "{:<44} {:>10} {:>9} {:>9} {:>14} {:>14} {:>7} {:>7}\n",
        "workload",
        "req/s",
        "p50 µs",
        "p99 µs",
        "server CPU/req",
        "client CPU/req",
        "vs 1st",
        "errors"
    );
    let micros = |cpu: Option<Duration>| {
        cpu.map(|cpu| format!("{} µs", cpu.as_micros()))
            .unwrap_or_else(|| "-".into())
    };
    for report in reports {
        out.push_str(&format!(
            "{:<44} {:>10.0} {:>9} {:>9} {:>14} {:>14} {:>6.2}x {:>7}\n",
            report.name,
            report.per_second(),
            report.p50.as_micros(),
            report.p99.as_micros(),
            micros(report.server_cpu_per_request),
            micros(report.client_cpu_per_request),
            report.per_second() / base,
            report.errors,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&sorted, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&sorted, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&[7], 99.0), Duration::from_micros(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn cpu_time_of_this_process_is_readable_and_grows() {
        let me = [std::process::id()];
        let before = cpu_time(&me).expect("own /proc stat");
        let mut x = 0u64;
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert!(x != 1);
        assert!(cpu_time(&me).expect("own /proc stat") >= before);
        assert_eq!(cpu_time(&[u32::MAX]), None);
        let main_thread = std::thread::current()
            .name()
            .unwrap_or_default()
            .chars()
            .take(15)
            .collect::<String>();
        assert!(thread_cpu_time(&[&main_thread]).is_some());
    }

    #[tokio::test]
    async fn counts_requests_and_errors() {
        let shape = LoadShape {
            concurrency: 2,
            warmup: Duration::from_millis(10),
            duration: Duration::from_millis(100),
        };
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        // A server meter that reads 0 s before the measured window and 10 s after it.
        let reads = std::sync::atomic::AtomicU64::new(0);
        let server = || {
            let read = reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(Duration::from_secs(10 * read))
        };
        let cpu = CpuMeters {
            server: &server,
            client: &|| None,
        };
        let report = run("test", shape, cpu, move || {
            let counter = counter.clone();
            async move {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                if n.is_multiple_of(2) {
                    Ok(())
                } else {
                    Err("odd")
                }
            }
        })
        .await;
        assert!(report.requests > 5, "{report:?}");
        assert!(report.errors > 5, "{report:?}");
        assert!(report.p50 >= Duration::from_millis(1));
        // Charged per successful request; an unreadable meter gives no figure, not zero.
        let requests = u32::try_from(report.requests).unwrap();
        assert_eq!(
            report.server_cpu_per_request,
            Some(Duration::from_secs(10) / requests)
        );
        assert_eq!(report.client_cpu_per_request, None);
    }

    #[tokio::test]
    async fn rounds_rotate_the_order_and_merge_every_turn() {
        let shape = LoadShape {
            concurrency: 2,
            warmup: Duration::from_millis(6),
            duration: Duration::from_millis(90),
        };
        // Which workload ran, once per change of turn.
        let turns = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        let workloads: Vec<Workload> = (0..3)
            .map(|id| {
                let turns = turns.clone();
                Workload::new(format!("w{id}"), move || {
                    let mut seen = turns.lock().unwrap();
                    if seen.last() != Some(&id) {
                        seen.push(id);
                    }
                    drop(seen);
                    async move {
                        tokio::time::sleep(Duration::from_millis(1 + id as u64)).await;
                        Ok::<(), &str>(())
                    }
                })
            })
            .collect();
        // Each measured turn reads the server meter at its start and end: one second apart.
        let reads = std::sync::atomic::AtomicU64::new(0);
        let server = || {
            let read = reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(Duration::from_secs(read))
        };
        let cpu = CpuMeters {
            server: &server,
            client: &|| None,
        };
        let reports = run_in_rounds(&workloads, shape, 3, cpu).await;

        assert_eq!(*turns.lock().unwrap(), [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        let names: Vec<&str> = reports.iter().map(|report| report.name.as_str()).collect();
        assert_eq!(names, ["w0", "w1", "w2"]);
        for report in &reports {
            assert!(report.requests > 3, "{report:?}");
            assert!(report.elapsed >= shape.duration, "{report:?}");
            // Three turns, one second of server CPU each, charged over all their requests.
            let requests = u32::try_from(report.requests).unwrap();
            assert_eq!(
                report.server_cpu_per_request,
                Some(Duration::from_secs(3) / requests),
                "{report:?}"
            );
            assert_eq!(report.client_cpu_per_request, None);
        }
        // The slower calls made fewer requests in the same time, turn by turn.
        assert!(reports[0].requests > reports[2].requests, "{reports:?}");
        assert_eq!(reports[0].turn_rates.len(), 3);
        for (fast, slow) in reports[0].turn_rates.iter().zip(&reports[2].turn_rates) {
            assert!(fast > slow, "{reports:?}");
        }
    }
}
