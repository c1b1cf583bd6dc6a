//! The daemon with stderr a pipe that is full and that nobody reads (a stalled log collector),
//! flooded with requests that each used to write a warning (a refused `Host`): it keeps
//! answering, `/healthz` too, and SIGTERM still ends it in time (security review N6).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, ChildGuard, free_port, wait_for_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stderr_never_stalls_the_daemon_or_its_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (reader, mut filler) = std::io::pipe().expect("pipe");
    let stderr = filler.try_clone().expect("clone the pipe");
    // Fill the pipe until a write blocks; the thread then waits there for good (it ends with an
    // error once the reader is dropped at the end of the test).
    std::thread::spawn(move || {
        let chunk = [b'.'; 4096];
        while filler.write_all(&chunk).is_ok() {}
    });
    std::thread::sleep(Duration::from_millis(300));

    let api = free_port();
    let health = free_port();
    let child = Command::new(BIN)
        .arg("run")
        .envs([
            ("APONO_DATA_DIR", dir.path().join("data").to_string_lossy().as_ref()),
            ("APONO_LISTEN_ADDR", &format!("127.0.0.1:{api}")),
            ("APONO_HEALTH_ADDR", &format!("127.0.0.1:{health}")),
            ("APONO_LOG_LEVEL", "debug"),
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn apono-connector");
    let mut daemon = ChildGuard(child);
    tokio::time::timeout(Duration::from_secs(30), wait_for_port(api))
        .await
        .expect("the operator API comes up with stderr full");

    // Each of these wrote a WARN line before; now a few do, the rest are counted.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let started = Instant::now();
    for i in 0..1_500 {
        let answer = client
            .get(format!("http://127.0.0.1:{api}/operator/v1/access-requests"))
            .header("Host", format!("evil-{i}.example"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} got no answer: {e}"));
        assert_eq!(answer.status().as_u16(), 403, "request {i}");
    }
    let flood = started.elapsed();
    let healthz = client
        .get(format!("http://127.0.0.1:{health}/healthz"))
        .send()
        .await
        .expect("/healthz answers");
    assert_eq!(healthz.status().as_u16(), 200);
    let metrics = client
        .get(format!("http://127.0.0.1:{health}/metrics"))
        .send()
        .await
        .expect("/metrics answers")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("apono_connector_log_lines_suppressed_total"),
        "{metrics}"
    );

    let pid = daemon.0.id().to_string();
    let sent = Instant::now();
    let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
    assert!(status.success());
    let deadline = sent + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = daemon.0.try_wait().expect("poll the daemon") {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not end the daemon within 10 s with stderr stalled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "1500 refused requests in {flood:?}; exit {exit} {:?} after SIGTERM",
        sent.elapsed()
    );
    assert!(exit.success(), "{exit}");
    drop(reader);
}
