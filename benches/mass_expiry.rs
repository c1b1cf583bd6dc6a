//! Mass expiry: how late the last revoke runs when many accesses end together. Run by hand
//! (`cargo bench --bench mass_expiry`); prints a Markdown table for the README.
//!
//! What it runs is what an operator runs: the real `run` binary (standalone, default settings
//! but the log level: `BENCH_LOG_LEVEL`, default `warn`),
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
//! `BENCH_RATE` (requests per second; unset: all at once) paces the access requests, so every
//! column's accesses expire at the same pace.
//!
//! The `https` columns (`BENCH_HTTPS_LATENCIES_MS`, default `0`; empty for none) serve the
//! simulator over TLS (`sim rancher --tls-cert`, the integration trusting its certificate) and add
//! the TLS handshakes the simulator completed, and per job: one per pooled connection, not per job.
//!
//! `BENCH_DATABASE=postgres` keeps the state in PostgreSQL instead of SQLite: a server of the
//! bench's own (`tests/common/postgres.rs`, as the tests start it; a database per column), and
//! `BENCH_REPLICAS` (default `1`; e.g. `1,2`) `run` processes on it with one operator token, the
//! access requests spread over them, a column per replica count. CPU is the replicas' sum, RSS the
//! largest replica's; PostgreSQL's own CPU per job is a row of its own (the server's processes).

use std::time::{Duration, Instant};

use apono_connector::control_plane::client::OperatorClient;
use apono_connector::control_plane::operator::{AccessRequest, AccessRequestCreate, AccessState, IntegrationRef};
use apono_connector::integrations::{Resource, Subject};
use futures::StreamExt;
use postgres::PgServer;
use secrecy::ExposeSecret;

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/postgres.rs"]
mod postgres;

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

/// CPU time of a PostgreSQL server so far, in milliseconds: its live processes', and what the
/// postmaster collected from backends that exited (their connections closed).
fn server_cpu_ms(pg: &PgServer) -> f64 {
    let pids = pg.pids();
    let Some(&main) = pids.first() else {
        return f64::NAN;
    };
    let stat = std::fs::read_to_string(format!("/proc/{main}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // cutime and cstime: fields 16 and 17.
    let reaped: f64 = [13, 14]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum::<f64>()
        * 10.0;
    pids.iter().map(|&p| cpu_ms(p)).sum::<f64>() + reaped
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
    /// PostgreSQL's CPU per job (on SQLite the store's work is in the daemon's).
    db_cpu_per_job_ms: Option<f64>,
    peak_rss: f64,
    connections: u64,
    requests: u64,
    handshakes: Option<u64>,
    failed: usize,
}

/// One column of the table: a Rancher latency, over http or https, and how many `run` replicas.
#[derive(Clone, Copy)]
struct Column {
    latency_ms: u64,
    https: bool,
    replicas: usize,
}

/// The operator token every replica on one database shares.
const SHARED_TOKEN: &str = "bench-operator-token-shared-by-the-replicas";

async fn run_once(column: Column, accesses: usize, ttl: u64, rate: Option<f64>, pg: Option<&PgServer>) -> Figures {
    let Column {
        latency_ms,
        https,
        replicas,
    } = column;
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
    // SQLite: one `run` in `dir`. PostgreSQL: `replicas` of them, each with its own config and
    // ports, on one database of this column's own.
    let url = pg.map(|pg| {
        pg.database(&format!("bench_{}", uuid::Uuid::new_v4().simple()))
            .expose_secret()
            .to_string()
    });
    let mut daemons = Vec::new();
    let mut operators = Vec::new();
    let mut pem = None;
    for r in 0..replicas {
        let rdir = dir.path().join(format!("replica{r}"));
        std::fs::create_dir_all(&rdir).expect("replica dir");
        let cp_port = free_port();
        let log_level = log_level();
        // The default lease; only where things are is configured.
        let config = write_control_plane_config(&rdir, cp_port, 60, &sim_url);
        if https {
            let bytes = std::fs::read(&cert).expect("the simulator's certificate");
            trust_sim_certificate(&config, &String::from_utf8_lossy(&bytes));
            pem = Some(bytes);
        }
        let mut envs = vec![
            ("APONO_HEALTH_ADDR", "127.0.0.1:0"),
            ("APONO_LOG_LEVEL", log_level.as_str()),
        ];
        if let Some(url) = &url {
            envs.extend([
                ("APONO_DATABASE_URL", url.as_str()),
                ("APONO_OPERATOR_TOKEN", SHARED_TOKEN),
            ]);
        }
        daemons.push(ChildGuard::spawn(&["run", "--config", &config], &envs, &rdir));
        wait_for_port(cp_port).await;
        let cp_url = format!("http://127.0.0.1:{cp_port}");
        operators.push(match &url {
            Some(_) => OperatorClient::new(&cp_url)
                .expect("operator client")
                .with_token(SHARED_TOKEN.to_string().into()),
            None => operator_client(&cp_url, &rdir.join("state")).await,
        });
    }
    let stats_client = match &pem {
        Some(pem) => reqwest::Client::builder()
            .tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem).expect("certificate PEM"))
            .build()
            .expect("stats client"),
        None => reqwest::Client::new(),
    };
    let operator = &operators[0];
    // Let start-up (the first sweep, the admin proof) finish before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids: Vec<u32> = daemons.iter().map(|d| d.0.id()).collect();
    let daemons_cpu = || pids.iter().map(|&p| cpu_ms(p)).sum::<f64>();
    let sim_pid = sim.0.id();
    let (cpu0, sim_cpu0) = (daemons_cpu(), cpu_ms(sim_pid));
    let db_cpu0 = pg.map(server_cpu_ms);

    let posting = tokio::time::Instant::now();
    let requests = futures::stream::iter(0..accesses)
        .map(|i| {
            // Spread over the replicas, as a load balancer in front of them would.
            let operator = &operators[i % operators.len()];
            async move {
                if let Some(rate) = rate {
                    tokio::time::sleep_until(posting + Duration::from_secs_f64(i as f64 / rate)).await;
                }
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

    // The figures come from the timestamps the state keeps, not from when this loop sees them, so
    // the loop looks seldom: no access can end before its TTL has run (it starts at the grant),
    // then once a second. Each look is a listing of every access, work the daemon does for this
    // observer, not for a job (reading 1,000 accesses every 0.5 s added about 0.1 ms per job).
    let deadline = Instant::now() + Duration::from_secs(env_u64("BENCH_DEADLINE_SECONDS", 600));
    tokio::time::sleep(Duration::from_secs(ttl)).await;
    let done: Vec<AccessRequest> = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let all = operator.list_access().await.expect("list");
        let ended = |a: &AccessRequest| matches!(a.state, AccessState::Revoked | AccessState::Failed);
        // Every requested access, each once (a listing that skips or repeats one is a bug).
        let listed: std::collections::HashSet<&str> = all.iter().map(|a| a.id.as_str()).collect();
        let missing: Vec<&String> = requests.iter().filter(|id| !listed.contains(id.as_str())).collect();
        if missing.is_empty() && all.len() == accesses && all.iter().all(ended) {
            break all;
        }
        if Instant::now() >= deadline {
            // What is left, so a stall can be looked into (the daemons log at warn only).
            let mut states = std::collections::BTreeMap::new();
            for a in &all {
                *states.entry(format!("{:?}", a.state)).or_insert(0usize) += 1;
            }
            for a in all.iter().filter(|a| !ended(a)).take(5) {
                eprintln!(
                    "not ended: {} {:?} created {} granted {:?} expires {:?} error {:?}",
                    a.id, a.state, a.created_at, a.granted_at, a.expires_at, a.last_error
                );
            }
            panic!(
                "accesses did not all end by the deadline: {} listed ({} distinct), by state {states:?}; \
                 {} requested ones not listed, e.g. {:?}",
                all.len(),
                listed.len(),
                missing.len(),
                missing.iter().take(5).collect::<Vec<_>>()
            );
        }
    };
    let cpu = daemons_cpu() - cpu0;
    let sim_cpu = cpu_ms(sim_pid) - sim_cpu0;
    // The whole server's: with several columns on one server, only this column's databases work.
    let db_cpu = pg.map(server_cpu_ms).zip(db_cpu0).map(|(b, a)| b - a);
    let peak_rss = pids.iter().map(|&p| peak_rss_mib(p)).fold(f64::NAN, f64::max);
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
    drop(daemons);
    drop(sim);
    Figures {
        grants_per_s: ok.len() as f64 / secs(last_granted - first_created).max(1e-3),
        revokes_per_s: ok.len() as f64 / secs(last_revoked - first_expiry).max(1e-3),
        last_lag: lags.last().copied().unwrap_or(f64::NAN),
        median_lag: lags.get(lags.len() / 2).copied().unwrap_or(f64::NAN),
        cpu_per_job_ms: cpu / jobs,
        sim_cpu_per_job_ms: sim_cpu / jobs,
        db_cpu_per_job_ms: db_cpu.map(|c| c / jobs),
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
    let on_postgres = match std::env::var("BENCH_DATABASE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("BENCH_DATABASE={other}: use sqlite (the default) or postgres"),
    };
    // `BENCH_PG_SETTINGS` adds server settings, e.g. `-c log_min_duration_statement=0` with a
    // `log_directory` outside the server's temporary directory, to count a job's statements.
    let pg = on_postgres.then(|| {
        PgServer::start_with(&[], &std::env::var("BENCH_PG_SETTINGS").unwrap_or_default())
            .expect("a PostgreSQL server for the bench (apt-get install postgresql)")
    });
    let ttl = env_u64("BENCH_TTL_SECONDS", 8);
    // Requests posted at this many per second instead of all at once: every column then grants,
    // and so expires, the accesses at the same pace (a faster configuration grants sooner, and
    // its accesses then end closer together, which costs it revoke lag that is not its own).
    let rate = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|r| r.parse::<f64>().ok())
        .filter(|r| *r > 0.0);
    // `BENCH_LATENCIES_MS=0 BENCH_HTTPS_LATENCIES_MS=` runs one column only.
    let latencies = |name: &str, default: &str| -> Vec<u64> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    // Several replicas share a database: SQLite runs one.
    let replica_counts: Vec<usize> = if on_postgres {
        latencies("BENCH_REPLICAS", "1")
            .into_iter()
            .map(|n| (n as usize).max(1))
            .collect()
    } else {
        vec![1]
    };
    let columns: Vec<Column> = latencies("BENCH_LATENCIES_MS", "0,20")
        .into_iter()
        .map(|latency_ms| (latency_ms, false))
        .chain(
            latencies("BENCH_HTTPS_LATENCIES_MS", "0")
                .into_iter()
                .map(|latency_ms| (latency_ms, true)),
        )
        .flat_map(|(latency_ms, https)| {
            replica_counts.iter().map(move |&replicas| Column {
                latency_ms,
                https,
                replicas,
            })
        })
        .collect();
    let figures: Vec<Figures> = columns
        .iter()
        .map(|&c| runtime.block_on(run_once(c, accesses, ttl, rate, pg.as_ref())))
        .collect();
    let row = |name: &str, f: &dyn Fn(&Figures) -> String| {
        let cells: Vec<String> = figures.iter().map(f).collect();
        format!("| {name} | {} |", cells.join(" | "))
    };
    println!(
        "{accesses} access requests ({}), TTL {ttl} s, default settings but log level {}, state in {}; {}",
        rate.map_or("all at once".to_string(), |r| format!("{r} per second")),
        log_level(),
        if on_postgres { "PostgreSQL" } else { "SQLite" },
        machine()
    );
    println!();
    let heads: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{} ms Rancher latency{}{}",
                c.latency_ms,
                if c.https { ", https" } else { "" },
                if on_postgres {
                    format!(", {} replica{}", c.replicas, if c.replicas == 1 { "" } else { "s" })
                } else {
                    String::new()
                }
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
    if on_postgres {
        println!(
            "{}",
            row("PostgreSQL CPU per job", &|f| f
                .db_cpu_per_job_ms
                .map_or("-".into(), |c| format!("{c:.2} ms")))
        );
    }
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

/// The daemons' log level: `BENCH_LOG_LEVEL`, default `warn` (`info`, the daemon's default, for a
/// run to be looked into; it costs CPU per job, see the README).
fn log_level() -> String {
    std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into())
}
