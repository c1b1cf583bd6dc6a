//! The operator token and the agent token go only to the control plane they name, as real
//! processes (issue 19 items 5 and 8; security review N5, N10, N11, N12): never through
//! `HTTP_PROXY` to loopback, never along a redirect, never in cleartext to another host unless
//! asked; names with control characters are refused at the operator API; `access list` walks
//! pages and shows a hostile row escaped.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use common::daemon::Daemon;
use common::{BIN, ChildGuard, free_port};
use serde_json::json;

/// A listener that counts the connections it gets and answers each with 502: a "proxy", or the
/// target of a redirect.
struct Counter {
    port: u16,
    hits: Arc<AtomicUsize>,
}

fn counter() -> Counter {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut s) = stream {
                use std::io::Write;
                let _ = s.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        }
    });
    Counter { port, hits }
}

/// Every proxy variable reqwest reads, pointing at `url`.
fn proxy_env(url: &str) -> Vec<(&'static str, String)> {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .into_iter()
    .map(|k| (k, url.to_string()))
    .collect()
}

fn cli(args: &[&str], envs: &[(&str, String)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("APONO_ALLOW_INSECURE_HTTP")
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("run apono-connector")
}

/// `access request` of cluster-owner on c-7x2k9 for `user`, against `url`.
fn access_request_args(url: &str, user: &str) -> Vec<String> {
    [
        "access",
        "request",
        "--control-plane",
        url,
        "--integration",
        "prod",
        "--user",
        user,
        "--role",
        "cluster-owner",
        "--resource",
        "c-7x2k9",
        "--ttl",
        "1h",
    ]
    .map(String::from)
    .to_vec()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_never_sends_the_operator_token_through_a_proxy_to_loopback() {
    let d = Daemon::start(String::new()).await;
    let token = common::operator_token(&d.data_dir()).await;
    let proxy = counter();
    let mut envs = proxy_env(&format!("http://127.0.0.1:{}", proxy.port));
    envs.push(("APONO_OPERATOR_TOKEN", token));
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("http://{host}:{}", d.port);
        let out = cli(&["access", "list", "--control-plane", &url], &envs);
        assert!(out.status.success(), "{host}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("STATE"), "{}", text(&out));
    }
    assert_eq!(
        proxy.hits.load(Ordering::SeqCst),
        0,
        "the proxy saw the operator's calls"
    );
}

/// Serves `app` on a free loopback port; returns the port.
async fn serve(app: Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A control plane that redirects everything to `target` (a 307 keeps the method and body).
async fn redirector(target: u16) -> (u16, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let app = Router::new().fallback(move |uri: Uri| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, format!("http://127.0.0.1:{target}{uri}"))
                .body(axum::body::Body::empty())
                .expect("response")
                .into_response()
        }
    });
    (serve(app).await, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed_with_a_token_or_a_body() {
    let target = counter();
    let (port, calls) = redirector(target.port).await;
    let url = format!("http://127.0.0.1:{port}");
    let envs = [("APONO_OPERATOR_TOKEN", "operator-token-redirect-canary".to_string())];
    let request = access_request_args(&url, "bob");
    let request: Vec<&str> = request.iter().map(String::as_str).collect();
    for args in [&request[..], &["access", "list", "--control-plane", &url][..]] {
        let out = cli(args, &envs);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(text(&out).contains("redirect"), "{args:?}: {}", text(&out));
    }

    // The agent in remote mode: its hello is redirected, and nothing follows it.
    let dir = tempfile::tempdir().expect("tempdir");
    let health = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data").to_string_lossy().into_owned();
    let _agent = ChildGuard::spawn(
        &["run"],
        &[
            ("APONO_URL", url.as_str()),
            ("APONO_TOKEN", "agent-token-redirect-canary"),
            ("APONO_CONNECTOR_ID", "c1"),
            ("APONO_HEALTH_ADDR", health.as_str()),
            ("APONO_DATA_DIR", data.as_str()),
            ("APONO_LOG_LEVEL", "error"),
        ],
        dir.path(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while calls.load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        calls.load(Ordering::SeqCst) >= 3,
        "the agent never called the control plane"
    );
    assert_eq!(
        target.hits.load(Ordering::SeqCst),
        0,
        "a redirect was followed: the token or a body went to its target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_to_another_host_needs_the_explicit_setting() {
    let envs = [("APONO_OPERATOR_TOKEN", "operator-token-cleartext".to_string())];
    let out = cli(
        &["access", "list", "--control-plane", "http://cp.example.invalid:8790"],
        &envs,
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("APONO_ALLOW_INSECURE_HTTP=true"), "{}", text(&out));

    let dir = tempfile::tempdir().expect("tempdir");
    let health = format!("127.0.0.1:{}", free_port());
    let run = |insecure: Option<&str>| {
        let mut c = Command::new(BIN);
        c.arg("run")
            .env_remove("APONO_ALLOW_INSECURE_HTTP")
            .envs([
                ("APONO_URL", "http://cp.example.invalid"),
                ("APONO_TOKEN", "agent-token-cleartext"),
                ("APONO_HEALTH_ADDR", health.as_str()),
                ("APONO_LOG_LEVEL", "warn"),
            ])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(v) = insecure {
            c.env("APONO_ALLOW_INSECURE_HTTP", v);
        }
        c.spawn().expect("spawn run")
    };
    // Refused at start, naming the setting.
    let child = run(None);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");
    assert!(!out.status.success());
    assert!(text(&out).contains("APONO_ALLOW_INSECURE_HTTP"), "{}", text(&out));
    // Allowed with it: the agent starts (and retries a host that does not resolve).
    let mut child = ChildGuard(run(Some("true")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.0.try_wait().expect("poll").is_none(),
        "run exited with APONO_ALLOW_INSECURE_HTTP=true"
    );
    child.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newline_in_a_username_is_refused_and_forges_no_log_line() {
    let sim = common::daemon::sim().await;
    let d = Daemon::start_opts(
        common::daemon::integration_toml("prod", &sim),
        common::daemon::DaemonOptions {
            log_to_file: true,
            ..Default::default()
        },
    )
    .await;
    let token = common::operator_token(&d.data_dir()).await;
    let url = format!("http://127.0.0.1:{}", d.port);
    let forged = "eve\n2026-12-07T00:00:00.000000Z  INFO access revoked access=ar-FORGED";
    let args = access_request_args(&url, forged);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli(&args, &[("APONO_OPERATOR_TOKEN", token.clone())]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("control character"), "{}", text(&out));
    let log = std::fs::read_to_string(d.log_path()).unwrap_or_default();
    assert!(!log.contains("ar-FORGED"), "{log}");
    let list = cli(
        &["access", "list", "--control-plane", &url],
        &[("APONO_OPERATOR_TOKEN", token)],
    );
    assert!(list.status.success(), "{}", text(&list));
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("eve"),
        "{}",
        text(&list)
    );
}

/// An operator API that serves `rows` access requests two at a time, the first with escape
/// sequences in its subject and last error (an old row, a hostile Rancher message).
async fn paged_operator_api(rows: usize) -> (u16, Arc<AtomicUsize>) {
    let pages = Arc::new(AtomicUsize::new(0));
    let seen = pages.clone();
    let all: Vec<serde_json::Value> = (0..rows)
        .map(|n| {
            let (user, error) = if n == 0 {
                (
                    "eve\u{1b}[2J\u{1b}[H".to_string(),
                    json!({"code": "rancher_error", "message": "denied \u{1b}]0;pwned\u{7}", "retryable": false}),
                )
            } else {
                (format!("user-{n}"), serde_json::Value::Null)
            };
            json!({
                "id": format!("ar-{n:04}"), "integration": "prod", "user": user, "role": "cluster-member",
                "resource": "c-1", "ttl_seconds": 60, "create_user": false, "state": "active",
                "created_at": "2026-12-07T00:00:00Z", "granted_at": null, "expires_at": null,
                "revoked_at": null, "grant_job_id": "j-1", "revoke_job_id": null, "user_id": null,
                "access_details": null, "last_error": error
            })
        })
        .collect();
    let app = Router::new().route(
        "/operator/v1/access-requests",
        axum::routing::get(move |axum::extract::RawQuery(query): axum::extract::RawQuery| {
            seen.fetch_add(1, Ordering::SeqCst);
            let query = query.unwrap_or_default();
            let after = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("after="))
                .map(str::to_string);
            let start = after.map_or(0, |a| {
                all.iter().position(|r| r["id"] == a.as_str()).map_or(0, |i| i + 1)
            });
            let page: Vec<_> = all.iter().skip(start).take(2).cloned().collect();
            let more = start + 2 < all.len();
            let next = page.last().and_then(|r| r["id"].as_str()).map(str::to_string);
            async move {
                let mut response = axum::Json(page).into_response();
                if more && let Some(next) = next {
                    response
                        .headers_mut()
                        .insert("x-next-cursor", next.parse().expect("header"));
                }
                response
            }
        }),
    );
    (serve(app).await, pages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_list_walks_every_page_and_escapes_control_characters() {
    let (port, pages) = paged_operator_api(5).await;
    let url = format!("http://127.0.0.1:{port}");
    let out = cli(
        &["access", "list", "--control-plane", &url],
        &[("APONO_OPERATOR_TOKEN", "operator-token-pages".to_string())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for n in 0..5 {
        assert!(stdout.contains(&format!("ar-{n:04}")), "row {n} missing:\n{stdout}");
    }
    assert_eq!(pages.load(Ordering::SeqCst), 3, "5 rows at 2 a page");
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\u{7}'),
        "raw escape sequences:\n{stdout:?}"
    );
    assert!(stdout.contains("eve\\u{1b}[2J"), "{stdout}");
}
