//! Memory has a budget (issue 19 item 3, security review 2 N7): a hostile Rancher serving huge
//! answers to many jobs at once does not take the daemon past the chart's memory limit (256 Mi),
//! and the jobs that could not read their answer fail with a typed, retryable error naming the
//! budget. Against the real `run` binary.

mod common;

use std::time::{Duration, Instant};

use apono_connector::control_plane::operator::{AccessRequestCreate, IntegrationRef};
use apono_connector::integrations::{Resource, Subject};
use axum::body::{Body, Bytes};
use axum::response::Response;
use common::{ChildGuard, free_port, operator_client, wait_for_port};
use futures::StreamExt as _;

/// Size of every answer: under the per-answer cap (64 MiB), so only the shared budget stops them.
const ANSWER: usize = 60 << 20;
/// The chart's memory limit.
const CHART_LIMIT_MIB: f64 = 256.0;
const JOBS: usize = 32;

/// Every request gets a 200 with an `ANSWER`-byte JSON collection (announced by
/// `Content-Length`): all but its last MiB at once, the rest after `stall`, so each answer holds
/// its memory for a while and many are in flight together.
async fn hostile_rancher(stall: Duration) -> String {
    let mib = Bytes::from(vec![b'x'; 1 << 20]);
    let app = axum::Router::new().fallback(move || {
        let mib = mib.clone();
        async move {
            let head = Bytes::from_static(b"{\"type\":\"collection\",\"data\":[],\"pad\":\"");
            let tail = Bytes::from_static(b"\"}");
            let pad = ANSWER - head.len() - tail.len();
            let (whole, last) = (pad / mib.len() - 1, pad - (pad / mib.len() - 1) * mib.len());
            let now = futures::stream::iter(std::iter::once(head).chain(std::iter::repeat_n(mib.clone(), whole)));
            let later = futures::stream::once(async move {
                tokio::time::sleep(stall).await;
                let mut rest = vec![b'x'; last];
                rest.extend_from_slice(&tail);
                Bytes::from(rest)
            });
            Response::builder()
                .header("content-type", "application/json")
                .header("content-length", ANSWER)
                .body(Body::from_stream(now.chain(later).map(Ok::<_, std::io::Error>)))
                .expect("response")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// `VmHWM` (peak resident memory) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_answers_to_many_jobs_keep_the_daemon_under_its_memory_limit_and_fail_naming_the_budget() {
    let host = hostile_rancher(Duration::from_secs(14)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cp_port = free_port();
    let config = dir.path().join("connector.toml");
    std::fs::write(
        &config,
        format!(
            "[standalone]\nlisten = \"127.0.0.1:{cp_port}\"\ndata_dir = \"{}\"\n\n\
             [[integrations]]\ntype = \"rancher\"\nname = \"hostile\"\nconfig = {{ host = \"{host}\" }}\n\
             secret_store = {{ type = \"APONO\", credentials = {{ access_key = \"token-x\", secret_key = \"not-a-real-key\" }} }}\n",
            dir.path().join("state").display()
        ),
    )
    .expect("write the config");
    let daemon = ChildGuard::spawn(
        &["run", "--config", &config.to_string_lossy()],
        &[("APONO_HEALTH_ADDR", "127.0.0.1:0"), ("APONO_LOG_LEVEL", "error")],
        dir.path(),
    );
    let pid = daemon.0.id();
    wait_for_port(cp_port).await;
    let operator = operator_client(&format!("http://127.0.0.1:{cp_port}"), &dir.path().join("state")).await;
    for i in 0..JOBS {
        operator
            .create_access(&AccessRequestCreate {
                integration: IntegrationRef::Name("hostile".into()),
                subject: Subject::user(&format!("user{i:05}")),
                role: "cluster-member".into(),
                resource: Resource::Cluster("c-7x2k9".into()),
                ttl_seconds: 600,
                create_user: false,
            })
            .await
            .expect("access request");
    }

    // Until a job reports the budget (a read waited 10 s for it), sampling the peak meanwhile.
    let deadline = Instant::now() + Duration::from_secs(120);
    let named = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peak = peak_rss_mib(pid);
        assert!(peak < CHART_LIMIT_MIB, "peak RSS {peak:.0} MiB, past the chart's limit");
        let all = operator.list_access().await.expect("list accesses");
        if let Some(e) = all
            .iter()
            .filter_map(|a| a.last_error.as_ref())
            .find(|e| e.message.contains("memory budget"))
        {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no job named the memory budget within 2 minutes; errors: {:?}",
            all.iter().filter_map(|a| a.last_error.as_ref()).collect::<Vec<_>>()
        );
    };
    assert!(named.retryable, "{named:?}");
    assert_eq!(named.code, "unavailable", "{named:?}");
    assert!(
        named.message.contains("96 MiB"),
        "the budget's size is named: {}",
        named.message
    );
    assert!(!named.message.contains("not-a-real-key"), "{}", named.message);
    // Let the answers that did get the budget finish and be decoded: still under the limit.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let peak = peak_rss_mib(pid);
    eprintln!("daemon peak RSS with {JOBS} jobs reading 60 MiB answers: {peak:.0} MiB");
    assert!(peak < CHART_LIMIT_MIB, "peak RSS {peak:.0} MiB, past the chart's limit");
    assert!(
        peak < 200.0,
        "peak RSS {peak:.0} MiB: the budget (96 MiB) plus the agent's own should stay well under"
    );
    drop(daemon);
}
