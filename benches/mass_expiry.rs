//! Mass expiry: how late the last revoke runs when many accesses end together. Run by hand
//! (`cargo bench --bench mass_expiry`); prints a Markdown table for the README.
//!
//! What it runs is what an operator runs: the real `run` binary (standalone, default settings),
//! the simulator as a process (`sim rancher --size large`, bindings settle as on Rancher 2.13),
//! and `BENCH_ACCESSES` (default 1,000) access requests with a TTL of `BENCH_TTL_SECONDS`
//! (default 8) posted to the operator API at once; at 0 and 20 ms of Rancher latency.
//!
//! - grants per second: accesses ÷ (last `granted_at` − first `created_at`);
//! - revokes per second: accesses ÷ (last `revoked_at` − first `expires_at`);
//! - the last and the median revoke after its expiry (`revoked_at` − `expires_at`);
//! - daemon CPU per job (user + system time of `run` over the run ÷ grant and revoke jobs), and
//!   the simulator's, so a slow simulator is not mistaken for a slow agent;
//! - peak RSS of `run`; TCP connections the simulator accepted (the agent's pool, not its jobs).
//!
//! The `https` columns (`BENCH_HTTPS_LATENCIES_MS`, default `0`; empty for none) serve the
//! simulator over TLS (`sim rancher --tls-cert`, the integration trusting its certificate) and add
//! the TLS handshakes the simulator completed, and per job: one per pooled connection, not per job.

use std::time::{Duration, Instant};

use apono_connector::control_plane::operator::{AccessRequest, AccessRequestCreate, AccessState, IntegrationRef};
use apono_connector::integrations::{Resource, Subject};
use futures::StreamExt;

#[path = "../tests/common/mod.rs"]
mod common;

use common::{ChildGuard, free_port, operator_client, wait_for_port, write_control_plane_config};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `VmHWM` of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// User + system CPU time of a process so far, in milliseconds (clock ticks of 10 ms).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) * 10.0
}

/// The `i`-th user of the large dataset: `user00001`, ..., with every fifth a GitHub user known
/// by its principal id (as `sim/data.rs` makes them).
fn large_dataset_user(i: usize) -> Subject {
    let j = i + 1;
    if j.is_multiple_of(5) {
        Subject::user(&format!("github_user://{}", 100_000 + j))
    } else {
        Subject::user(&format!("user{j:05}"))
    }
}

struct Figures {
    grants_per_s: f64,
    revokes_per_s: f64,
    last_lag: f64,
    median_lag: f64,
    cpu_per_job_ms: f64,
    sim_cpu_per_job_ms: f64,
    peak_rss: f64,
    connections: u64,
    requests: u64,
    handshakes: Option<u64>,
    failed: usize,
}

/// One column of the table: a Rancher latency, over http or https.
#[derive(Clone, Copy)]
struct Column {
    latency_ms: u64,
    https: bool,
}

async fn run_once(column: Column, accesses: usize, ttl: u64) -> Figures {
    let Column { latency_ms, https } = column;
    let dir = tempfile::tempdir().expect("tempdir");
    let sim_port = free_port();
    let cert = dir.path().join("sim-cert.pem");
    let cert_arg = cert.to_string_lossy().into_owned();
    let mut sim_args = vec![
        "sim".to_string(),
        "rancher".into(),
        "--size".into(),
        "large".into(),
        "--listen".into(),
        format!("127.0.0.1:{sim_port}"),
        "--latency-ms".into(),
        latency_ms.to_string(),
    ];
    if https {
        sim_args.extend(["--tls-cert".to_string(), cert_arg]);
    }
    let sim_args: Vec<&str> = sim_args.iter().map(String::as_str).collect();
    let sim = ChildGuard::spawn(&sim_args, &[], dir.path());
    wait_for_port(sim_port).await;
    let scheme = if https { "https" } else { "http" };
    let sim_url = format!("{scheme}://127.0.0.1:{sim_port}");
    let cp_port = free_port();
    // The default lease; only where things are is configured.
    let config = write_control_plane_config(dir.path(), cp_port, 60, &sim_url);
    let stats_client = if https {
        let pem = std::fs::read(&cert).expect("the simulator's certificate");
        trust_sim_certificate(&config, &String::from_utf8_lossy(&pem));
        reqwest::Client::builder()
            .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("certificate PEM"))
            .build()
            .expect("stats client")
    } else {
        reqwest::Client::new()
    };
    let daemon = ChildGuard::spawn(
        &["run", "--config", &config],
        &[("APONO_HEALTH_ADDR", "127.0.0.1:0"), ("APONO_LOG_LEVEL", "warn")],
        dir.path(),
    );
    wait_for_port(cp_port).await;
    let cp_url = format!("http://127.0.0.1:{cp_port}");
    let operator = operator_client(&cp_url, &dir.path().join("state")).await;
    // Let start-up (the first sweep, the admin proof) finish before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (daemon_pid, sim_pid) = (daemon.0.id(), sim.0.id());
    let (cpu0, sim_cpu0) = (cpu_ms(daemon_pid), cpu_ms(sim_pid));

    let requests = futures::stream::iter(0..accesses)
        .map(|i| {
            let operator = &operator;
            async move {
                operator
                    .create_access(&AccessRequestCreate {
                        integration: IntegrationRef::Name("sim".into()),
                        subject: large_dataset_user(i),
                        role: "cluster-member".into(),
                        resource: Resource::Cluster("c-7x2k9".into()),
                        ttl_seconds: ttl,
                        create_user: false,
                    })
                    .await
                    .expect("access request")
                    .id
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<String>>()
        .await;
    assert_eq!(requests.len(), accesses);

    let deadline = Instant::now() + Duration::from_secs(600);
    let done: Vec<AccessRequest> = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let all = operator.list_access().await.expect("list");
        let ended = |a: &AccessRequest| matches!(a.state, AccessState::Revoked | AccessState::Failed);
        if all.len() >= accesses && all.iter().all(ended) {
            break all;
        }
        assert!(Instant::now() < deadline, "accesses did not all end within 10 minutes");
    };
    let cpu = cpu_ms(daemon_pid) - cpu0;
    let sim_cpu = cpu_ms(sim_pid) - sim_cpu0;
    let peak_rss = peak_rss_mib(daemon_pid);
    let stats: serde_json::Value = stats_client
        .get(format!("{sim_url}/sim/stats"))
        .send()
        .await
        .expect("sim stats")
        .json()
        .await
        .expect("sim stats json");
    if std::env::var_os("BENCH_ROUTES").is_some() {
        eprintln!("{:#}", stats["routes"]);
    }

    // A grant that failed for good ends `revoked` (cleaned up) or `failed`, never granted.
    let failed = done.iter().filter(|a| a.granted_at.is_none()).count();
    let ok: Vec<&AccessRequest> = done
        .iter()
        .filter(|a| a.state == AccessState::Revoked && a.granted_at.is_some())
        .collect();
    let secs = |d: chrono::TimeDelta| d.num_milliseconds() as f64 / 1000.0;
    let first_created = ok.iter().map(|a| a.created_at).min().expect("accesses");
    let last_granted = ok.iter().filter_map(|a| a.granted_at).max().expect("granted");
    let first_expiry = ok.iter().filter_map(|a| a.expires_at).min().expect("expiry");
    let last_revoked = ok.iter().filter_map(|a| a.revoked_at).max().expect("revoked");
    let mut lags: Vec<f64> = ok
        .iter()
        .filter_map(|a| Some(secs(a.revoked_at? - a.expires_at?)))
        .collect();
    lags.sort_by(f64::total_cmp);
    let jobs = (2 * ok.len()).max(1) as f64;
    drop(daemon);
    drop(sim);
    Figures {
        grants_per_s: ok.len() as f64 / secs(last_granted - first_created).max(1e-3),
        revokes_per_s: ok.len() as f64 / secs(last_revoked - first_expiry).max(1e-3),
        last_lag: lags.last().copied().unwrap_or(f64::NAN),
        median_lag: lags.get(lags.len() / 2).copied().unwrap_or(f64::NAN),
        cpu_per_job_ms: cpu / jobs,
        sim_cpu_per_job_ms: sim_cpu / jobs,
        peak_rss,
        connections: stats["connections"].as_u64().unwrap_or(0),
        requests: stats["total"].as_u64().unwrap_or(0),
        handshakes: https.then(|| stats["handshakes"].as_u64().unwrap_or(0)),
        failed,
    }
}

/// Adds the simulator's certificate to the `sim` integration of a config file
/// `write_control_plane_config` wrote (its inline `config = { host = ... }` table).
fn trust_sim_certificate(config: &str, pem: &str) {
    let text = std::fs::read_to_string(config).expect("read the config");
    let pem = pem.trim().replace('\n', "\\n");
    let text = text.replacen(
        "config = { host = ",
        &format!("config = {{ certificate_authority = \"{pem}\", host = "),
        1,
    );
    std::fs::write(config, text).expect("write the config");
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {model}")
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench --bench mass_expiry`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let accesses = env_u64("BENCH_ACCESSES", 1000) as usize;
    let ttl = env_u64("BENCH_TTL_SECONDS", 8);
    // `BENCH_LATENCIES_MS=0 BENCH_HTTPS_LATENCIES_MS=` runs one column only.
    let latencies = |name: &str, default: &str| -> Vec<u64> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let columns: Vec<Column> = latencies("BENCH_LATENCIES_MS", "0,20")
        .into_iter()
        .map(|latency_ms| Column {
            latency_ms,
            https: false,
        })
        .chain(
            latencies("BENCH_HTTPS_LATENCIES_MS", "0")
                .into_iter()
                .map(|latency_ms| Column {
                    latency_ms,
                    https: true,
                }),
        )
        .collect();
    let figures: Vec<Figures> = columns
        .iter()
        .map(|&c| runtime.block_on(run_once(c, accesses, ttl)))
        .collect();
    let row = |name: &str, f: &dyn Fn(&Figures) -> String| {
        let cells: Vec<String> = figures.iter().map(f).collect();
        format!("| {name} | {} |", cells.join(" | "))
    };
    println!(
        "{accesses} access requests, TTL {ttl} s, default settings; {}",
        machine()
    );
    println!();
    let heads: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{} ms Rancher latency{}",
                c.latency_ms,
                if c.https { ", https" } else { "" }
            )
        })
        .collect();
    println!("| figure | {} |", heads.join(" | "));
    println!("|---{}|", "|---".repeat(columns.len()));
    println!("{}", row("grants per second", &|f| format!("{:.0}", f.grants_per_s)));
    println!("{}", row("revokes per second", &|f| format!("{:.0}", f.revokes_per_s)));
    println!(
        "{}",
        row("last revoke after its expiry", &|f| format!("{:.1} s", f.last_lag))
    );
    println!(
        "{}",
        row("median revoke after its expiry", &|f| format!("{:.1} s", f.median_lag))
    );
    println!(
        "{}",
        row("daemon CPU per job", &|f| format!("{:.2} ms", f.cpu_per_job_ms))
    );
    println!(
        "{}",
        row("simulator CPU per job", &|f| format!("{:.2} ms", f.sim_cpu_per_job_ms))
    );
    println!("{}", row("peak RSS", &|f| format!("{:.0} MB", f.peak_rss)));
    println!("{}", row("connections to Rancher", &|f| f.connections.to_string()));
    println!(
        "{}",
        row("Rancher requests per job", &|f| format!(
            "{:.1}",
            f.requests as f64 / (2 * accesses).max(1) as f64
        ))
    );
    println!(
        "{}",
        row("TLS handshakes (per job)", &|f| match f.handshakes {
            Some(h) => format!("{h} ({:.3})", h as f64 / (2 * accesses).max(1) as f64),
            None => "-".into(),
        })
    );
    println!("{}", row("accesses failed", &|f| f.failed.to_string()));
}
