//! Remote mode over HTTPS: the control plane's certificate is trusted through `SSL_CERT_FILE`
//! (and refused without it), and `HTTPS_PROXY` carries the agent's traffic (unless `NO_PROXY`
//! names the host). Real processes of the agent; the control plane and a CONNECT proxy in-process.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use apono_connector::control_plane::embedded::{EmbeddedControlPlane, Options};
use apono_connector::control_plane::server;
use common::{ChildGuard, free_port, wait_ready};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "tls-token-8c2a";
/// A name only the test proxy knows (it tunnels it to 127.0.0.1): the agent never sends a
/// loopback control plane through a proxy (security review N5), so the proxied case needs a name.
const PROXIED_HOST: &str = "cp.proxy.test";

/// The embedded control plane served over HTTPS with a self-signed certificate for 127.0.0.1.
async fn https_control_plane(dir: &std::path::Path) -> (String, std::path::PathBuf, Arc<EmbeddedControlPlane>) {
    let ck = rcgen::generate_simple_self_signed(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        PROXIED_HOST.to_string(),
    ])
    .unwrap();
    let cert_path = dir.join("cp.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    let cp = EmbeddedControlPlane::open(Options {
        data_dir: dir.join("state"),
        ..Options::default()
    })
    .unwrap();
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        ck.cert.pem().into_bytes(),
        ck.signing_key.serialize_pem().into_bytes(),
    )
    .await
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = server::router(
        cp.clone(),
        server::Access {
            agent_token: Some(TOKEN.to_string().into()),
            agent_token_file: None,
            operator_token: "operator-token-unused".to_string().into(),
            listen: addr,
        },
    )
    .unwrap();
    let server = axum_server::from_tcp_rustls(listener, config).unwrap();
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    (format!("https://127.0.0.1:{}", addr.port()), cert_path, cp)
}

/// A minimal HTTP CONNECT proxy on loopback; counts the tunnels it opened.
async fn connect_proxy() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tunnels = Arc::new(AtomicU64::new(0));
    let count = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut line = String::new();
                if client.read_line(&mut line).await.is_err() {
                    return;
                }
                let Some(target) = line.strip_prefix("CONNECT ").and_then(|r| r.split_whitespace().next()) else {
                    return;
                };
                let target = target.replace(PROXIED_HOST, "127.0.0.1");
                // Skip the rest of the request head.
                loop {
                    let mut header = String::new();
                    match client.read_line(&mut header).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if header == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.get_mut().write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                if client
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(client.get_mut(), &mut upstream).await;
            });
        }
    });
    (format!("http://127.0.0.1:{}", addr.port()), tunnels)
}

fn agent(dir: &std::path::Path, cp_url: &str, extra: &[(&str, &str)]) -> (ChildGuard, u16) {
    let health = free_port();
    let health_addr = format!("127.0.0.1:{health}");
    let mut env = vec![
        ("APONO_URL", cp_url),
        ("APONO_TOKEN", TOKEN),
        ("APONO_CONNECTOR_ID", "tls-connector"),
        ("APONO_HEALTH_ADDR", health_addr.as_str()),
    ];
    env.extend_from_slice(extra);
    // The test's own proxy settings must not leak into the child.
    let mut child = std::process::Command::new(common::BIN);
    child
        .arg("run")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .env_remove("SSL_CERT_FILE")
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    (ChildGuard(child.spawn().expect("spawn agent")), health)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_certificate_comes_from_ssl_cert_file_and_traffic_goes_through_https_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (cp_url, cert, _cp) = https_control_plane(dir.path()).await;
    let cert = cert.to_string_lossy().into_owned();

    // Not trusted: the agent is alive but not ready, and says why.
    let (_untrusting, health) = agent(dir.path(), &cp_url, &[]);
    let body = wait_ready(health, 503, "certificate", Duration::from_secs(20)).await;
    assert!(body.contains("SSL_CERT_FILE"), "the reason says what to do: {body}");

    // Trusted through SSL_CERT_FILE, and through the proxy.
    let (proxy, tunnels) = connect_proxy().await;
    let proxied_url = cp_url.replace("127.0.0.1", PROXIED_HOST);
    let (_trusting, health) = agent(
        dir.path(),
        &proxied_url,
        &[("SSL_CERT_FILE", &cert), ("HTTPS_PROXY", &proxy)],
    );
    wait_ready(health, 200, "ready", Duration::from_secs(20)).await;
    assert!(
        tunnels.load(Ordering::SeqCst) >= 1,
        "the agent's connection went through HTTPS_PROXY"
    );

    // A control plane on loopback: ready without a tunnel, NO_PROXY or not (the proxy would
    // see the agent token in the CONNECT-less case, and has no business on loopback anyway).
    let before = tunnels.load(Ordering::SeqCst);
    let (_direct, health) = agent(
        dir.path(),
        &cp_url,
        &[("SSL_CERT_FILE", &cert), ("HTTPS_PROXY", &proxy)],
    );
    wait_ready(health, 200, "ready", Duration::from_secs(20)).await;
    assert_eq!(
        tunnels.load(Ordering::SeqCst),
        before,
        "loopback went through the proxy"
    );
}

/// Rancher over HTTPS: trusted through the integration's `certificate_authority`, or through
/// `SSL_CERT_FILE`; refused with a clear error otherwise; reached through `HTTPS_PROXY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rancher_is_trusted_through_the_integration_ca_or_ssl_cert_file_and_reached_through_the_proxy() {
    use apono_connector::sim::{Sim, SimOptions};
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let ca_pem = ck.cert.pem();
    let ca_path = dir.path().join("rancher-ca.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();
    let sim = Sim::new(SimOptions::default());
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        ca_pem.clone().into_bytes(),
        ck.signing_key.serialize_pem().into_bytes(),
    )
    .await
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = axum_server::from_tcp_rustls(listener, config).unwrap();
    let app = sim.router();
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    let (access_key, secret_key) = sim.api_key();
    let integration = |ca: Option<&str>| {
        let mut config = serde_json::json!({"host": format!("https://127.0.0.1:{port}")});
        if let Some(ca) = ca {
            config["certificate_authority"] = ca.into();
        }
        serde_json::json!({
            "type": "rancher", "name": "tls", "config": config,
            "secret_store": {"type": "APONO", "credentials": {"access_key": access_key, "secret_key": secret_key}},
        })
        .to_string()
    };
    let grant = |integration: String, envs: Vec<(&'static str, String)>| {
        let dir = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BIN)
                .args(["grant", "--integration", &integration])
                .args(["--user", "alice", "--role", "cluster-member", "--resource", "c-7x2k9"])
                .env_remove("HTTPS_PROXY")
                .env_remove("https_proxy")
                .env_remove("SSL_CERT_FILE")
                .envs(envs)
                .current_dir(dir)
                .output()
                .unwrap()
        })
    };

    let refused = grant(integration(None), vec![]).await.unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.to_ascii_lowercase().contains("certificate"), "{stderr}");

    let with_ca = grant(integration(Some(&ca_pem)), vec![]).await.unwrap();
    assert!(with_ca.status.success(), "{}", String::from_utf8_lossy(&with_ca.stderr));

    let (proxy, tunnels) = connect_proxy().await;
    let with_env = grant(
        integration(None),
        vec![
            ("SSL_CERT_FILE", ca_path.to_string_lossy().into_owned()),
            ("HTTPS_PROXY", proxy),
        ],
    )
    .await
    .unwrap();
    assert!(
        with_env.status.success(),
        "{}",
        String::from_utf8_lossy(&with_env.stderr)
    );
    assert!(
        tunnels.load(Ordering::SeqCst) >= 1,
        "Rancher was reached through HTTPS_PROXY"
    );
    let bindings: Vec<_> = sim
        .bindings()
        .into_iter()
        .filter(|b| {
            b.user_id.as_deref() == Some("u-alice1") && b.role_id == "cluster-member" && b.resource_id == "c-7x2k9"
        })
        .collect();
    assert_eq!(bindings.len(), 1, "one binding after two grants: {bindings:?}");
}
