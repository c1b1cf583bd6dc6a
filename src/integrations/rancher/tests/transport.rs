//! transport tests (issue 10): TLS trust, cleartext, gzip, body caps, `Retry-After`, key scope and
//! `ext/` key expiry. Against the simulator, or a scripted server where it cannot do the thing.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::Response;
use chrono::SecondsFormat;

use super::*;

// ---------------------------------------------------------------------------------------------
// A scripted Rancher: just what validate and a user listing read, with the real 401 body.
// ---------------------------------------------------------------------------------------------

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    accept_encoding: String,
    at: Instant,
}

/// The `Retry-After` a fault carries.
#[derive(Debug, Clone, Copy)]
enum RetryAfter {
    Seconds(u64),
    /// An HTTP date this many seconds after the answer is sent (whole seconds, as HTTP has).
    DateIn(i64),
}

impl RetryAfter {
    fn header(self) -> String {
        match self {
            RetryAfter::Seconds(s) => s.to_string(),
            RetryAfter::DateIn(s) => http_date(chrono::Utc::now() + chrono::Duration::seconds(s)),
        }
    }
}

/// IMF-fixdate, as servers write `Retry-After` dates.
fn http_date(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

#[derive(Clone, Default)]
struct Script {
    /// Compress answers with gzip when the request accepts it.
    gzip: bool,
    /// The key works only on `/v3/clusters/{scope}` (a cluster-scoped key).
    scope: Option<&'static str>,
    /// The ext token `tok-1` as `/v1/ext.cattle.io.tokens/tok-1` serves it.
    ext_token: Option<Value>,
    /// `/v3/users` answers these first, in order.
    faults: Arc<Mutex<Vec<(u16, RetryAfter)>>>,
    /// Users in `/v3/users` besides the key's owner (to make a body large).
    extra_users: usize,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Script {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

/// Rancher's auth filter writes this for every 401, whatever the cause (`pkg/auth/requests/filter.go`).
fn must_authenticate() -> (u16, Value) {
    (
        401,
        json!({"type": "error", "status": "401", "message": "Unauthorized 401: must authenticate"}),
    )
}

fn answer(script: &Script, path: &str) -> (u16, Value) {
    if let Some(scope) = script.scope
        && !path.starts_with(&format!("/v3/clusters/{scope}"))
    {
        return must_authenticate();
    }
    match path {
        "/v3/users" => {
            let mut data = vec![json!({"id": "user-admin", "username": "admin", "name": "Admin", "me": true})];
            data.extend(
                (0..script.extra_users).map(|i| json!({"id": format!("u-{i:05}"), "username": format!("user{i}")})),
            );
            (200, json!({"type": "collection", "data": data}))
        }
        "/v3/tokens/token-abc" => (
            200,
            json!({"id": "token-abc", "userId": "user-admin", "clusterId": null, "expiresAt": "", "expired": false, "enabled": true}),
        ),
        "/v1/ext.cattle.io.tokens/tok-1" => match &script.ext_token {
            Some(t) => (200, t.clone()),
            None => (
                404,
                json!({"type": "error", "status": 404, "code": "NotFound", "message": "tokens.ext.cattle.io \"tok-1\" not found"}),
            ),
        },
        "/v3/settings/server-version" => (200, json!({"id": "server-version", "value": "v2.12.1"})),
        "/v3/globalrolebindings" => (
            200,
            json!({"type": "collection", "data": [{"id": "grb-admin", "globalRoleId": "admin", "userId": "user-admin"}]}),
        ),
        p if p.starts_with("/v3/clusters/") => (200, json!({"id": p.trim_start_matches("/v3/clusters/")})),
        _ => (
            404,
            json!({"type": "error", "status": 404, "code": "NotFound", "message": "not found"}),
        ),
    }
}

async fn scripted(State(script): State<Script>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_string();
    let accept_encoding = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    script.hits.lock().unwrap().push(Hit {
        path: path.clone(),
        accept_encoding: accept_encoding.clone(),
        at: Instant::now(),
    });
    let fault = (path == "/v3/users")
        .then(|| {
            let mut f = script.faults.lock().unwrap();
            (!f.is_empty()).then(|| f.remove(0))
        })
        .flatten();
    let mut builder = Response::builder().header(header::CONTENT_TYPE, "application/json");
    let (status, body) = match fault {
        Some((status, retry_after)) => {
            builder = builder.header(header::RETRY_AFTER, retry_after.header());
            (
                status,
                json!({"type": "error", "status": status, "message": "slow down"}),
            )
        }
        None => answer(&script, &path),
    };
    let mut bytes = serde_json::to_vec(&body).unwrap();
    if script.gzip && accept_encoding.contains("gzip") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&bytes).unwrap();
        bytes = enc.finish().unwrap();
        builder = builder.header(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    builder.status(status).body(Body::from(bytes)).unwrap()
}

fn script_app(script: &Script) -> Router {
    Router::new().fallback(scripted).with_state(script.clone())
}

async fn serve_http(script: &Script) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = script_app(script);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn scripted_rancher(host: &str, token: &str, extra: Value) -> Rancher {
    let mut config = json!({"host": host});
    if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
        c.extend(e);
    }
    let key = ApiKey::from_secret(&secret(&[("token", token)])).unwrap();
    Rancher::from_parts(RancherConfig::from_value(&config).unwrap(), key)
        .unwrap()
        .with_retry(FAST_RETRY)
}

// ---------------------------------------------------------------------------------------------
// Cleartext only on this machine
// ---------------------------------------------------------------------------------------------

#[test]
fn http_to_a_host_off_this_machine_needs_insecure_http() {
    let m = config_err(json!({"host": "http://rancher.example.com"}));
    assert!(m.contains("cleartext") && m.contains("insecure_http: true"), "{m}");
    let m = config_err(json!({"host": "http://10.0.0.5:8080"}));
    assert!(m.contains("insecure_http"), "{m}");
    let c = RancherConfig::from_value(&json!({"host": "http://rancher.example.com", "insecure_http": true})).unwrap();
    assert_eq!(c.base_url.as_str(), "http://rancher.example.com/");
    for loopback in [
        "http://127.0.0.1:8080",
        "http://127.1.2.3",
        "http://localhost:9",
        "http://[::1]:8080",
    ] {
        assert!(
            RancherConfig::from_value(&json!({ "host": loopback })).is_ok(),
            "{loopback} is on this machine"
        );
    }
    assert!(config_err(json!({"host": "r.example.com", "insecure_http": "yes"})).contains("insecure_http"));
}

// ---------------------------------------------------------------------------------------------
// A private CA: trusted when given, and nothing else is
// ---------------------------------------------------------------------------------------------

/// A CA, and a server certificate for `localhost`/`127.0.0.1` it signed: (CA PEM, cert PEM, key PEM).
fn ca_and_server_cert() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem())
}

#[tokio::test]
async fn a_private_ca_is_trusted_and_a_server_signed_by_another_is_refused() {
    let (ca, cert, key) = ca_and_server_cert();
    let (other_ca, _, _) = ca_and_server_cert();
    let script = Script::default();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(cert.into_bytes(), key.into_bytes())
        .await
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = axum_server::from_tcp_rustls(listener, tls).unwrap();
    let app = script_app(&script);
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    let host = format!("https://localhost:{port}");

    let trusting = scripted_rancher(&host, "token-abc:canary", json!({"certificate_authority": ca}));
    let v = trusting
        .validate()
        .await
        .expect("the handshake succeeds with the CA that signed the server");
    assert_eq!(v.principal, "admin");

    let other = scripted_rancher(&host, "token-abc:canary", json!({"certificate_authority": other_ca}));
    let e = other.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::Config { .. }), "{e:?}");
    assert!(!e.retryable());
    assert!(e.to_string().contains("certificate_authority"), "{e}");

    let public_roots_only = scripted_rancher(&host, "token-abc:canary", json!({}));
    let e = public_roots_only.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::Config { .. }), "{e:?}");
    // The refused handshakes reached no handler; only the trusting client's requests did.
    assert_eq!(script.hits().len(), 4, "{:?}", script.hits());
}

// ---------------------------------------------------------------------------------------------
// gzip and the body cap
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn answers_compressed_with_gzip_are_asked_for_and_read() {
    let script = Script {
        gzip: true,
        ..Script::default()
    };
    let addr = serve_http(&script).await;
    let r = scripted_rancher(&format!("http://{addr}"), "token-abc:canary", json!({}));
    let v = r.validate().await.unwrap();
    assert_eq!(v.principal, "admin");
    assert_eq!(v.details["rancher_version"], json!("v2.12.1"));
    let hits = script.hits();
    assert!(!hits.is_empty());
    assert!(hits.iter().all(|h| h.accept_encoding.contains("gzip")), "{hits:?}");
}

/// A listing page larger than the cap is refused with what to do, whether its size is announced
/// (Content-Length) or only known once decoded (gzip).
#[tokio::test]
async fn an_answer_past_the_body_cap_is_refused_with_what_to_do() {
    for gzip in [false, true] {
        let script = Script {
            gzip,
            extra_users: 200,
            ..Script::default()
        };
        let addr = serve_http(&script).await;
        let config = RancherConfig::from_value(&json!({"host": format!("http://{addr}"), "page_size": 200})).unwrap();
        let key = ApiKey::from_secret(&secret(&[("token", "token-abc:canary")])).unwrap();
        let client = Client::new(&config, &key).unwrap().with_max_body(4 << 10);
        let e = client
            .list::<model::User>(&["v3", "users"], &[], "users")
            .collect_matching(|_| true)
            .await
            .unwrap_err();
        assert!(matches!(e, IntegrationError::Protocol { .. }), "gzip {gzip}: {e:?}");
        let m = e.to_string();
        assert!(m.contains("GET /v3/users") && m.contains("4 KiB"), "{m}");
        assert!(m.contains("page_size") && m.contains("200"), "{m}");
        assert_eq!(script.hits().len(), 1, "not retried");

        // Under the cap, the same answer is read.
        let client = Client::new(&config, &key).unwrap();
        let users = client
            .list::<model::User>(&["v3", "users"], &[], "users")
            .collect_matching(|_| true)
            .await
            .unwrap();
        assert_eq!(users.len(), 201);
    }
}

// ---------------------------------------------------------------------------------------------
// Retry-After
// ---------------------------------------------------------------------------------------------

#[test]
fn retry_after_reads_seconds_and_http_dates_and_is_bounded() {
    let now = chrono::Utc::now();
    let h = |v: &str| {
        let mut m = HeaderMap::new();
        m.insert(header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        client::retry_after(&m, now)
    };
    assert_eq!(h("3"), Some(Duration::from_secs(3)));
    assert_eq!(h("3600"), Some(client::MAX_RETRY_AFTER));
    let wait = h(&http_date(now + chrono::Duration::seconds(20))).unwrap();
    assert!(
        wait > Duration::from_secs(18) && wait <= Duration::from_secs(20),
        "{wait:?}"
    );
    assert_eq!(h(&http_date(now - chrono::Duration::seconds(20))), Some(Duration::ZERO));
    assert_eq!(h("soon"), None);
    assert_eq!(client::retry_after(&HeaderMap::new(), now), None);
}

/// The retries wait at least what the server asked (a plain backoff here is at most 20 ms).
#[tokio::test]
async fn retry_after_is_honoured_on_429_and_503() {
    let script = Script::default();
    script
        .faults
        .lock()
        .unwrap()
        .extend([(429, RetryAfter::Seconds(1)), (503, RetryAfter::DateIn(2))]);
    let addr = serve_http(&script).await;
    let r = scripted_rancher(&format!("http://{addr}"), "token-abc:canary", json!({}));
    let users = r
        .client()
        .list::<model::User>(&["v3", "users"], &[], "users")
        .collect_matching(|_| true)
        .await
        .unwrap();
    assert_eq!(users.len(), 1);
    let hits: Vec<Hit> = script.hits().into_iter().filter(|h| h.path == "/v3/users").collect();
    assert_eq!(hits.len(), 3, "{hits:?}");
    let first_wait = hits[1].at - hits[0].at;
    let second_wait = hits[2].at - hits[1].at;
    assert!(first_wait >= Duration::from_secs(1), "{first_wait:?}");
    // The date has whole seconds: at least 1 s of the 2 were still to come.
    assert!(second_wait >= Duration::from_millis(900), "{second_wait:?}");
}

// ---------------------------------------------------------------------------------------------
// Keys: cluster scope by probing, ext/ key expiry
// ---------------------------------------------------------------------------------------------

/// Rancher's 401 never says a key is scoped; a probe of `/v3/clusters/{id}` does.
#[tokio::test]
async fn a_scoped_key_is_named_by_probing_the_cluster_it_works_on() {
    let script = Script {
        scope: Some("local"),
        ..Script::default()
    };
    let addr = serve_http(&script).await;
    let r = scripted_rancher(&format!("http://{addr}"), "token-abc:canary", json!({}));
    let e = r.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("token-abc is scoped to cluster local") && m.contains("no scope"),
        "{m}"
    );
    assert!(!m.contains("canary"), "{m}");
    assert!(script.hits().iter().any(|h| h.path == "/v3/clusters/local"));

    // Through the simulator: discover and revoke, which start with the admin proof, say it too.
    let sim = sim().await;
    sim.sim.set_key_scope(Some("local"));
    let r = rancher(&sim);
    let e = r.discover(mpsc::channel(10).0).await.unwrap_err();
    assert!(e.to_string().contains("scoped to cluster local"), "{e}");
    let e = r
        .revoke(&revoke_req("bob", "cluster-member", "c-7x2k9"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("scoped to cluster local"), "{e}");
    // A key refused for another reason is not called scoped.
    sim.sim.set_key_scope(None);
    let wrong = rancher_with(&sim, json!({}), Some("not-the-secret"));
    let e = wrong.validate().await.unwrap_err();
    assert!(!e.to_string().contains("scoped to cluster local"), "{e}");
    assert!(e.to_string().contains("or it is scoped to a cluster"), "{e}");
    sim.stop().await;
}

fn ext_token(expires_at: Option<chrono::DateTime<chrono::Utc>>, expired: bool) -> Value {
    json!({
        "id": "tok-1",
        "type": "ext.cattle.io.token",
        "apiVersion": "ext.cattle.io/v1",
        "kind": "Token",
        "metadata": {"name": "tok-1"},
        "spec": {"userID": "user-admin", "clusterName": "", "ttl": 2_592_000_000i64, "enabled": true, "kind": ""},
        "status": {
            "current": true,
            "expired": expired,
            "expiresAt": expires_at.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)).unwrap_or_default(),
            "authProvider": "local",
        },
    })
}

/// A 2.12+ `ext/` key's expiry is read from the ext tokens API and warned about like a v3 key's.
#[tokio::test]
async fn an_ext_key_has_its_expiry_checked_through_the_ext_tokens_api() {
    let now = chrono::Utc::now();
    let script = Script {
        ext_token: Some(ext_token(
            Some(now + chrono::Duration::days(3) + chrono::Duration::hours(1)),
            false,
        )),
        ..Script::default()
    };
    let addr = serve_http(&script).await;
    let host = format!("http://{addr}");
    let r = scripted_rancher(&host, "ext/tok-1:canary", json!({}));
    let v = r.validate().await.unwrap();
    assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
    assert!(v.warnings[0].contains("expires in 3 day"), "{:?}", v.warnings);
    assert_eq!(v.details["expires_in_days"], json!(3));
    assert_eq!(v.details["scope"], json!("none"));
    assert!(script.hits().iter().any(|h| h.path == "/v1/ext.cattle.io.tokens/tok-1"));
    assert!(!script.hits().iter().any(|h| h.path.starts_with("/v3/tokens")));

    // Expired: refused with what to do.
    let script = Script {
        ext_token: Some(ext_token(Some(now - chrono::Duration::hours(1)), true)),
        ..Script::default()
    };
    let addr = serve_http(&script).await;
    let r = scripted_rancher(&format!("http://{addr}"), "ext/tok-1:canary", json!({}));
    let e = r.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }), "{e:?}");
    assert!(e.to_string().contains("tok-1 has expired"), "{e}");

    // Through the simulator's ext tokens (sent as `ext/<name>:<secret>`, read at `/v1`).
    let sim = sim().await;
    sim.sim.set_api_key("ext/tok-sim", "canary-ext-secret");
    sim.sim
        .set_key_expiry(Some(now + chrono::Duration::days(5) + chrono::Duration::hours(1)));
    let r = rancher(&sim);
    let v = r.validate().await.unwrap();
    assert!(
        v.warnings.len() == 1 && v.warnings[0].contains("tok-sim expires in 5 day"),
        "{:?}",
        v.warnings
    );
    sim.sim.set_key_scope(Some("c-7x2k9"));
    let e = r.validate().await.unwrap_err();
    assert!(matches!(e, IntegrationError::CredentialsRefused { .. }), "{e:?}");
    assert!(!e.to_string().contains("canary"), "{e}");
    sim.stop().await;

    // A server without the ext API (before 2.12): the key works, the check is said to be skipped.
    let script = Script::default();
    let addr = serve_http(&script).await;
    let r = scripted_rancher(&format!("http://{addr}"), "ext/tok-1:canary", json!({}));
    let v = r.validate().await.unwrap();
    assert!(
        v.warnings.iter().any(|w| w.contains("expiry are not checked")),
        "{:?}",
        v.warnings
    );
}

// ---------------------------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------------------------

/// A Rancher address that answers 307 elsewhere: the key is not sent on, nor any body; the error
/// names where it pointed and what to set (security review N12).
#[tokio::test]
async fn a_redirect_is_not_followed_with_the_key_and_says_where_it_pointed() {
    let other = Script::default();
    let elsewhere = serve_http(&other).await;
    let target = format!("http://{elsewhere}/v3");
    let redirecting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = redirecting.local_addr().unwrap();
    let location = target.clone();
    let app = Router::new().fallback(move || {
        let location = location.clone();
        async move {
            Response::builder()
                .status(307)
                .header(header::LOCATION, location)
                .body(Body::empty())
                .unwrap()
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(redirecting, app).await;
    });
    let r = scripted_rancher(&format!("http://{addr}"), "token-abc:canary", json!({}));
    let e = r.validate().await.unwrap_err();
    let m = e.to_string();
    assert!(m.contains(&target) && m.contains("not followed"), "{m}");
    assert!(!m.contains("canary"), "{m}");
    assert!(other.hits().is_empty(), "the other address was sent {:?}", other.hits());
}
