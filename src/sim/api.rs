//! The HTTP layer: auth, routing, Norman collections (filters, sort, pagination), errors, latency,
//! fault injection and request stats.
//!
//! Routing is done by hand on the raw path (one fallback handler) rather than with axum routes:
//! Norman matches collection names case-insensitively, principal ids arrive with `%2F`-encoded
//! slashes, actions ride in the query string, and every `/v3` request must pass through the same
//! stats, latency, fault and auth steps in one place.

use std::borrow::Cow;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use chrono::SecondsFormat;
use serde_json::{Map, Value, json};

use super::store::{self, ApiError, Ctx, Item, k8s_not_found};
use super::view::{View, binding_schema};
use super::{FaultOptions, KeyState, Sim, lock};
use crate::integrations::BindingScope;

pub(crate) fn router(sim: Sim) -> Router {
    Router::new()
        .route("/sim/stats", get(sim_stats))
        .route("/sim/bindings", get(sim_bindings))
        .route("/sim/users", get(sim_users))
        .fallback(entry)
        .layer(axum::middleware::from_fn_with_state(sim.clone(), date_header))
        .with_state(sim)
}

/// Every answer's `Date` is the simulator's clock ([`Sim::set_clock_offset`]): what a client
/// reads as "Rancher's time" (hyper adds its own only when the header is missing).
async fn date_header(State(sim): State<Sim>, request: Request, next: axum::middleware::Next) -> Response {
    let mut response = next.run(request).await;
    let date = sim.now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    if let Ok(v) = header::HeaderValue::from_str(&date) {
        response.headers_mut().insert(header::DATE, v);
    }
    response
}

async fn sim_stats(State(sim): State<Sim>) -> Json<super::SimStats> {
    Json(sim.stats())
}

async fn sim_bindings(State(sim): State<Sim>) -> Json<Vec<super::SimBinding>> {
    Json(sim.bindings())
}

async fn sim_users(State(sim): State<Sim>) -> Json<Vec<super::SimUser>> {
    Json(sim.users())
}

// ----- faults -----

#[derive(Debug)]
struct Pending {
    route: Option<String>,
    remaining: usize,
    status: u16,
    after_commit: bool,
    /// The error's message, instead of the status's default.
    message: Option<String>,
}

/// A per-route fault counted down per request; `usize::MAX` never runs out.
#[derive(Debug)]
struct RouteFault<T> {
    route: String,
    remaining: usize,
    what: T,
}

/// Takes the first fault for `route` (counting it down) and returns what it does.
fn take<T: Clone>(faults: &mut Vec<RouteFault<T>>, route: &str) -> Option<T> {
    let i = faults.iter().position(|f| f.route == route)?;
    let f = &mut faults[i];
    let what = f.what.clone();
    if f.remaining != usize::MAX {
        f.remaining -= 1;
        if f.remaining == 0 {
            faults.remove(i);
        }
    }
    Some(what)
}

/// Pending exact faults (`fail_next`, `empty_lists_on`, `slow_next_on`) and the seeded random
/// ones.
#[derive(Debug)]
pub(crate) struct FaultState {
    options: FaultOptions,
    counter: u64,
    queue: Vec<Pending>,
    empty_lists: Vec<RouteFault<()>>,
    slow: Vec<RouteFault<Duration>>,
}

#[derive(Debug, Default)]
struct Decision {
    /// `(status, after_commit)`
    error: Option<(u16, bool)>,
    /// The injected error's message, when the fault gave one.
    message: Option<String>,
    slow: Option<Duration>,
    /// Answer a list with no items (RBAC-filtered or lagging informer).
    empty_list: bool,
}

impl FaultState {
    pub fn new(options: FaultOptions) -> FaultState {
        FaultState {
            options,
            counter: 0,
            queue: Vec::new(),
            empty_lists: Vec::new(),
            slow: Vec::new(),
        }
    }

    pub fn push_empty_lists(&mut self, route: &str, n: usize) {
        if n > 0 {
            self.empty_lists.push(RouteFault {
                route: route.to_string(),
                remaining: n,
                what: (),
            });
        }
    }

    pub fn clear_empty_lists(&mut self) {
        self.empty_lists.clear();
    }

    pub fn push_slow(&mut self, route: &str, n: usize, delay: Duration) {
        if n > 0 {
            self.slow.push(RouteFault {
                route: route.to_string(),
                remaining: n,
                what: delay,
            });
        }
    }

    pub fn push(&mut self, route: Option<String>, n: usize, status: u16, after_commit: bool, message: Option<String>) {
        if n > 0 {
            self.queue.push(Pending {
                route,
                remaining: n,
                status,
                after_commit,
                message,
            });
        }
    }

    pub fn set_options(&mut self, options: FaultOptions) {
        self.options = options;
        self.counter = 0;
    }

    fn decide(&mut self, route: &str, write: bool) -> Decision {
        let mut d = Decision {
            slow: take(&mut self.slow, route),
            empty_list: take(&mut self.empty_lists, route).is_some(),
            ..Decision::default()
        };
        if let Some(i) = self
            .queue
            .iter()
            .position(|p| p.route.as_deref().is_none_or(|r| r == route))
        {
            let p = &mut self.queue[i];
            p.remaining -= 1;
            d.error = Some((p.status, p.after_commit));
            d.message = p.message.clone();
            if p.remaining == 0 {
                self.queue.remove(i);
            }
            return d;
        }
        let o = &self.options;
        if o.error_rate <= 0.0 && o.slow_rate <= 0.0 {
            return d;
        }
        let n = self.counter;
        self.counter += 1;
        let draw = |salt: u64| {
            (store::mix(o.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt) >> 11) as f64 / (1u64 << 53) as f64
        };
        if draw(1) < o.error_rate {
            let status = if draw(2) < 0.5 { 500 } else { 503 };
            let after = write && draw(3) < o.after_commit_share;
            d.error = Some((if after { 500 } else { status }, after));
        }
        if draw(4) < o.slow_rate {
            d.slow = Some(d.slow.unwrap_or_default() + o.slow_delay);
        }
        d
    }
}

fn fault_error(status: u16, message: Option<&str>) -> ApiError {
    let (code, default) = match status {
        500 => ("ServerError", "Internal error occurred (simulated fault)"),
        502 => ("BadGateway", "bad gateway (simulated fault)"),
        503 => ("ClusterUnavailable", "cluster not available (simulated fault)"),
        504 => ("GatewayTimeout", "gateway timeout (simulated fault)"),
        429 => ("TooManyRequests", "too many requests (simulated fault)"),
        409 => ("Conflict", "the object has been modified (simulated fault)"),
        404 => ("NotFound", "not found (simulated fault)"),
        403 => ("PermissionDenied", "permission denied (simulated fault)"),
        _ => ("ServerError", "simulated fault"),
    };
    ApiError::new(status, code, message.unwrap_or(default))
}

// ----- responses -----

fn json_response(status: u16, v: &Value) -> Response {
    bytes_response(status, serde_json::to_vec(v).unwrap_or_default())
}

/// The envelope's JSON with `"data":[<page>]` appended.
fn splice(envelope: &Value, page: Vec<u8>) -> Vec<u8> {
    let mut out = serde_json::to_vec(envelope).unwrap_or_default();
    if out.last() == Some(&b'}') {
        out.pop();
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(b"\"data\":[");
        out.extend_from_slice(&page);
        out.extend_from_slice(b"]}");
    }
    out
}

fn bytes_response(status: u16, body: Vec<u8>) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Authentication failures do not use the Norman shape: `status` is a string, no `code`.
fn unauthorized(message: &str) -> (u16, Value) {
    (401, json!({"type": "error", "status": "401", "message": message}))
}

// ----- request parsing -----

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which API a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    /// Norman, `/v3`.
    V3,
    /// Steve, `/v1` (only `ext.cattle.io.tokens` here).
    V1,
    /// The downstream clusters' Kubernetes API through Rancher, `/k8s`.
    K8s,
}

impl Root {
    fn prefix(self) -> &'static str {
        match self {
            Root::V3 => "/v3",
            Root::V1 => "/v1",
            Root::K8s => "/k8s",
        }
    }
}

pub(crate) struct Req {
    method: Method,
    root: Root,
    /// Decoded path segments after the root (`/v3`, `/v1`, `/k8s`).
    segs: Vec<String>,
    query: Vec<(String, String)>,
    /// `scheme://host`
    base: String,
    /// The raw request path (for links and `next`).
    path: String,
    body: Vec<u8>,
    /// Answer lists with no items (an [`super::Sim::empty_lists_on`] fault).
    empty_list: bool,
    /// A list's page, serialized straight from the store by [`list`] and spliced into the
    /// envelope as `data` when answering (pages of thousands never become `Value` trees).
    page: std::cell::RefCell<Option<Vec<u8>>>,
}

impl Req {
    fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn url_with(&self, marker: Option<&str>) -> String {
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in self.query.iter().filter(|(k, _)| k != "marker") {
            ser.append_pair(k, v);
        }
        if let Some(m) = marker {
            ser.append_pair("marker", m);
        }
        let q = ser.finish();
        if q.is_empty() {
            format!("{}{}", self.base, self.path)
        } else {
            format!("{}{}?{q}", self.base, self.path)
        }
    }

    fn current_url(&self) -> String {
        let marker = self.param("marker").map(str::to_string);
        self.url_with(marker.as_deref())
    }

    fn body_object(&self) -> Result<Map<String, Value>, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Map::new());
        }
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(ApiError::invalid_body("Failed to parse body: expected a JSON object")),
            Err(e) => Err(ApiError::invalid_body(format!("Failed to parse body: {e}"))),
        }
    }
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("http");
    format!("{scheme}://{host}")
}

/// `METHOD /v3/<collection>[/{id}][?action=<a>]` (or `/v1`, `/k8s`), ids replaced by `{id}`.
fn route_key(method: &Method, root: Root, segs: &[String], action: Option<&str>) -> String {
    let mut k = format!("{method} {}", root.prefix());
    match segs {
        [] => {}
        [c, rest @ ..] if root == Root::V3 && c.eq_ignore_ascii_case("cluster") => {
            k.push_str("/cluster");
            for (i, _) in rest.iter().enumerate().take(3) {
                match i {
                    1 => k.push_str(&format!("/{}", rest[1].to_ascii_lowercase())),
                    _ => k.push_str("/{id}"),
                }
            }
        }
        [c, rest @ ..] => {
            k.push('/');
            k.push_str(&c.to_ascii_lowercase());
            if !rest.is_empty() {
                k.push_str("/{id}");
            }
            for s in rest.iter().skip(1) {
                k.push('/');
                k.push_str(s);
            }
        }
    }
    if let Some(a) = action {
        k.push_str("?action=");
        k.push_str(a);
    }
    k
}

/// Minimal base64 (standard or URL-safe alphabet, padding optional), to read Basic auth without
/// a new dependency.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.trim().bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        buf = (buf << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `(access_key, secret_key, ext)` from `Authorization: Bearer a:s`, `Basic base64(a:s)` or the
/// `R_SESS` cookie; an `ext/` prefix on the access key is dropped and reported as `ext`.
fn credentials(headers: &HeaderMap) -> Option<(String, String, bool)> {
    let raw = if let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()) {
        let (scheme, value) = auth.trim().split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") {
            value.trim().to_string()
        } else if scheme.eq_ignore_ascii_case("basic") {
            String::from_utf8(base64_decode(value)?).ok()?
        } else {
            return None;
        }
    } else {
        let cookies = headers.get(header::COOKIE).and_then(|h| h.to_str().ok())?;
        cookies
            .split(';')
            .find_map(|c| c.trim().strip_prefix("R_SESS=").map(pct_decode))?
    };
    let (access, secret) = raw.split_once(':')?;
    let (access, ext) = match access.strip_prefix("ext/") {
        Some(name) => (name, true),
        None => (access, false),
    };
    Some((access.to_string(), secret.to_string(), ext))
}

/// Whether the request carries the current key, unexpired, of an enabled owner. An `ext/` key
/// is looked up among ext tokens only, a plain one among v3 tokens only
/// (`pkg/auth/requests/authenticate.go`).
fn authenticates(key: &KeyState, headers: &HeaderMap, st: &store::State) -> bool {
    credentials(headers).is_some_and(|(a, s, ext)| a == key.access_key && s == key.secret_key && ext == key.ext)
        && key.expires_at.is_none_or(|t| t > st.now_utc())
        && st.users.get(&key.owner).is_some_and(|u| u.enabled)
}

// ----- the /v3 entry point -----

async fn entry(State(sim): State<Sim>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let Some(root) = [Root::V3, Root::V1, Root::K8s]
        .into_iter()
        .find(|r| path == r.prefix() || path.starts_with(&format!("{}/", r.prefix())))
    else {
        return json_response(404, &ApiError::not_found(format!("{path} not found")).to_json());
    };
    let segs: Vec<String> = path[root.prefix().len()..]
        .split('/')
        .filter(|s| !s.is_empty())
        .map(pct_decode)
        .collect();
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let action = query.iter().find(|(k, _)| k == "action").map(|(_, v)| v.clone());
    let route = route_key(&parts.method, root, &segs, action.as_deref());
    {
        let mut stats = lock(&sim.inner.stats);
        stats.total += 1;
        *stats.routes.entry(route.clone()).or_insert(0) += 1;
    }
    let write = matches!(parts.method, Method::POST | Method::PUT | Method::DELETE);
    let decision = lock(&sim.inner.faults).decide(&route, write);
    let latency = *sim.inner.latency.read().unwrap_or_else(|e| e.into_inner());
    let delay = latency + decision.slow.unwrap_or_default() + disconnect_stall(&sim, root, &segs, &parts.headers);
    // Read before any wait: the body belongs to the connection, the wait does not.
    let body = match axum::body::to_bytes(body, 16 << 20).await {
        Ok(b) => b.to_vec(),
        Err(e) => {
            let err = ApiError::invalid_body(format!("Failed to read body: {e}"));
            return json_response(err.status, &err.to_json());
        }
    };
    let req = Req {
        method: parts.method.clone(),
        root,
        segs,
        query,
        base: base_url(&parts.headers),
        path,
        body,
        empty_list: decision.empty_list,
        page: Default::default(),
    };
    if delay.is_zero() {
        return answer(&sim, decision, &req, &parts.headers);
    }
    // A slow server finishes the request even when the client has given up: the work runs in
    // its own task, which dropping this handler (the client hanging up) does not cancel.
    let headers = parts.headers;
    let task = tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        answer(&sim, decision, &req, &headers)
    });
    task.await.unwrap_or_else(|e| {
        let err = ApiError::new(500, "ServerError", format!("simulator request task failed: {e}"));
        json_response(err.status, &err.to_json())
    })
}

/// Handles the request, or answers the injected fault instead (after applying it when the fault
/// is after-commit).
fn answer(sim: &Sim, decision: Decision, req: &Req, headers: &HeaderMap) -> Response {
    let injected = decision.error.is_some() || decision.slow.is_some() || decision.empty_list;
    let (status, value) = match decision.error {
        Some((status, false)) => (status, fault_error(status, decision.message.as_deref()).to_json()),
        _ => {
            let answer = handle(sim, req, headers).unwrap_or_else(|e| (e.status, e.to_json()));
            match (decision.error, req.page.take()) {
                (Some((status, true)), _) => (status, fault_error(status, decision.message.as_deref()).to_json()),
                (None, Some(page)) => {
                    let (status, envelope) = answer;
                    finish_stats(sim, status, injected);
                    return bytes_response(status, splice(&envelope, page));
                }
                _ => answer,
            }
        }
    };
    finish_stats(sim, status, injected);
    json_response(status, &value)
}

fn finish_stats(sim: &Sim, status: u16, injected: bool) {
    let mut stats = lock(&sim.inner.stats);
    if status >= 400 {
        stats.errors += 1;
    }
    if injected {
        stats.injected_faults += 1;
    }
}

/// How long an authenticated request to a disconnected cluster waits in Rancher's dialer
/// (`pkg/dialer/factory.go`: four tries with a jittered 5 s sleep) before it fails.
fn disconnect_stall(sim: &Sim, root: Root, segs: &[String], headers: &HeaderMap) -> Duration {
    if root != Root::V3 || segs.len() < 2 || !segs[0].eq_ignore_ascii_case("cluster") {
        return Duration::ZERO;
    }
    let key = sim.key();
    let st = lock(&sim.inner.state);
    if st.disconnected.contains(&segs[1]) && authenticates(&key, headers, &st) {
        st.disconnect_stall
    } else {
        Duration::ZERO
    }
}

/// Authenticates, checks the key's scope, then routes. Every refusal is the same 401 body
/// (`pkg/auth/requests/filter.go`): it never says whether the key is wrong, expired, disabled
/// or scoped to another cluster.
fn handle(sim: &Sim, req: &Req, headers: &HeaderMap) -> Result<(u16, Value), ApiError> {
    let key = sim.key();
    let mut st = lock(&sim.inner.state);
    if !authenticates(&key, headers, &st) {
        return Ok(unauthorized("Unauthorized 401: must authenticate"));
    }
    if let Some(scope) = &key.cluster_id {
        let segs = &req.segs;
        let cluster_path = match req.root {
            Root::V3 => {
                segs.len() >= 2 && (segs[0].eq_ignore_ascii_case("clusters") || segs[0].eq_ignore_ascii_case("cluster"))
            }
            Root::K8s => segs.len() >= 2 && segs[0] == "clusters",
            Root::V1 => false,
        };
        if !(cluster_path && &segs[1] == scope) {
            return Ok(unauthorized("Unauthorized 401: must authenticate"));
        }
    }
    match req.root {
        Root::V3 => route(&mut st, req, &key),
        Root::V1 => route_v1(&st, req, &key),
        Root::K8s => route_k8s(&st, req, &key.owner),
    }
}

/// Steve's `/v1`: only `GET /v1/ext.cattle.io.tokens/{name}`, the 2.12+ ext token of the key
/// (rancher `pkg/apis/ext.cattle.io/v1/types.go` Token; `pkg/ext/stores/tokens`).
fn route_v1(st: &store::State, req: &Req, key: &KeyState) -> Result<(u16, Value), ApiError> {
    match req.segs.as_slice() {
        [kind, name] if kind == "ext.cattle.io.tokens" => {
            allow(req, &[Method::GET])?;
            if key.ext && *name == key.access_key {
                Ok((200, ext_token_json(key, st, &req.base)))
            } else {
                Err(ApiError::not_found(format!(
                    "tokens.ext.cattle.io \"{name}\" not found"
                )))
            }
        }
        _ => Err(ApiError::not_found(format!("{} not found", req.path))),
    }
}

/// `/k8s/clusters/{id}/...`, a cluster's Kubernetes API through Rancher's proxy (the caller
/// impersonated): `version`, enough to tell that a cluster-scoped key works on its own cluster,
/// and `SelfSubjectAccessReview`s, which ask the cluster's RBAC what the key's owner may do.
fn route_k8s(st: &store::State, req: &Req, owner: &str) -> Result<(u16, Value), ApiError> {
    let segs: Vec<&str> = req.segs.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["clusters", id, "version"] if st.clusters.contains_key(*id) => {
            allow(req, &[Method::GET])?;
            Ok((
                200,
                json!({"major": "1", "minor": "31", "gitVersion": "v1.31.4+rke2r1", "platform": "linux/amd64"}),
            ))
        }
        [
            "clusters",
            id,
            "apis",
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
        ] if st.clusters.contains_key(*id) => {
            allow(req, &[Method::POST])?;
            access_review(st, req, id, owner)
        }
        _ => Err(ApiError::not_found(format!("{} not found", req.path))),
    }
}

/// A `SelfSubjectAccessReview` (authorization.k8s.io/v1): 201 with `status.allowed`. On `local`
/// the owner's RBAC is the rules of the global roles bound to it or to its groups (Rancher makes
/// a ClusterRole per global role and binds it to the GRB's user or group,
/// `globalrolebinding_handler.go`); on a downstream cluster only an admin is allowed everything
/// (its `globaladmin-` binding to cluster-admin).
fn access_review(st: &store::State, req: &Req, cluster: &str, owner: &str) -> Result<(u16, Value), ApiError> {
    let body = req.body_object()?;
    let spec = body.get("spec").cloned().unwrap_or(Value::Null);
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let listed = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
    let allowed = if cluster != "local" {
        st.is_admin(owner)
    } else if let Some(attrs) = spec.get("resourceAttributes") {
        let (verb, group, resource) = (text(attrs, "verb"), text(attrs, "group"), text(attrs, "resource"));
        st.global_rules(owner)
            .iter()
            .any(|r| listed(&r.verbs, &verb) && listed(&r.api_groups, &group) && listed(&r.resources, &resource))
    } else if let Some(attrs) = spec.get("nonResourceAttributes") {
        let (verb, path) = (text(attrs, "verb"), text(attrs, "path"));
        st.global_rules(owner).iter().any(|r| {
            listed(&r.verbs, &verb)
                && r.non_resource_urls.iter().any(|u| {
                    u == "*" || *u == path || u.strip_suffix('*').is_some_and(|prefix| path.starts_with(prefix))
                })
        })
    } else {
        return Err(ApiError::new(
            400,
            "BadRequest",
            "SelfSubjectAccessReview.authorization.k8s.io \"\" is invalid: spec: exactly one of nonResourceAttributes \
             or resourceAttributes must be specified",
        ));
    };
    Ok((
        201,
        json!({
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": {"allowed": allowed},
        }),
    ))
}

fn allow(req: &Req, methods: &[Method]) -> Result<(), ApiError> {
    if methods.contains(&req.method) {
        Ok(())
    } else {
        Err(ApiError::new(
            405,
            "MethodNotAllow",
            format!("Method {} not supported", req.method),
        ))
    }
}

/// A filterable field and its Norman type, which decides its modifiers (rancher/norman
/// `types/reflection.go` setupFilters).
type Filter = (&'static str, Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// string, enum, date or `reference[...]`: `eq`, `ne`, `in`, `notin`.
    Str,
    /// boolean: `eq`, `ne` only.
    Bool,
}

use Kind::{Bool, Str};

const CLUSTER_FILTERS: &[Filter] = &[("id", Str), ("name", Str)];
const PROJECT_FILTERS: &[Filter] = &[("id", Str), ("name", Str), ("clusterId", Str)];
const NAMESPACE_FILTERS: &[Filter] = &[("id", Str), ("name", Str), ("projectId", Str)];
const GLOBAL_ROLE_FILTERS: &[Filter] = &[("id", Str), ("name", Str), ("builtin", Bool), ("newUserDefault", Bool)];
const ROLE_TEMPLATE_FILTERS: &[Filter] = &[
    ("id", Str),
    ("name", Str),
    ("context", Str),
    ("builtin", Bool),
    ("locked", Bool),
    ("hidden", Bool),
];
const USER_FILTERS: &[Filter] = &[
    ("id", Str),
    ("username", Str),
    ("me", Bool),
    ("enabled", Bool),
    ("mustChangePassword", Bool),
];
const GRB_FILTERS: &[Filter] = &[
    ("id", Str),
    ("name", Str),
    ("userId", Str),
    ("groupPrincipalId", Str),
    ("globalRoleId", Str),
];
const CRTB_FILTERS: &[Filter] = &[
    ("id", Str),
    ("name", Str),
    ("clusterId", Str),
    ("userId", Str),
    ("userPrincipalId", Str),
    ("groupPrincipalId", Str),
    ("roleTemplateId", Str),
];
const PRTB_FILTERS: &[Filter] = &[
    ("id", Str),
    ("name", Str),
    ("projectId", Str),
    ("userId", Str),
    ("userPrincipalId", Str),
    ("groupPrincipalId", Str),
    ("roleTemplateId", Str),
];

fn route(st: &mut store::State, req: &Req, key: &KeyState) -> Result<(u16, Value), ApiError> {
    st.purge();
    st.reconcile(std::time::Instant::now());
    let ctx_base = req.base.clone();
    let owner = key.owner.clone();
    let ctx = st.ctx(&ctx_base, &owner);
    let view = View::new(st, &owner);
    let segs: Vec<&str> = req.segs.iter().map(String::as_str).collect();
    let Some((first, rest)) = segs.split_first() else {
        allow(req, &[Method::GET])?;
        return Ok((200, api_root(&ctx)));
    };
    let coll = first.to_ascii_lowercase();
    let action = req.param("action");
    match (coll.as_str(), rest) {
        ("clusters", []) => {
            allow(req, &[Method::GET])?;
            let visible = st
                .clusters
                .values()
                .filter(|c| view.listed(&c.id) && view.cluster(&c.id));
            Ok((200, list(visible, CLUSTER_FILTERS, "cluster", req, &ctx)))
        }
        ("clusters", [id]) => {
            allow(req, &[Method::GET])?;
            view.may("get", view.cluster(id), "clusters", id)?;
            st.clusters
                .get(*id)
                .map(|c| (200, c.render(&ctx)))
                .ok_or_else(|| k8s_not_found("clusters", id))
        }
        ("projects", []) => {
            allow(req, &[Method::GET])?;
            let visible = st.projects.values().filter(|p| view.listed(&p.id) && view.project(p));
            Ok((200, list(visible, PROJECT_FILTERS, "project", req, &ctx)))
        }
        ("projects", [id]) => {
            allow(req, &[Method::GET])?;
            let name = id.split_once(':').map_or(*id, |(_, p)| p);
            let allowed = st.projects.get(*id).is_some_and(|p| view.project(p));
            view.may("get", allowed, "projects", id)?;
            st.projects
                .get(*id)
                .map(|p| (200, p.render(&ctx)))
                .ok_or_else(|| k8s_not_found("projects", name))
        }
        ("cluster", [cid, sub, tail @ ..]) if sub.eq_ignore_ascii_case("namespaces") => {
            allow(req, &[Method::GET])?;
            let Some(nss) = st.namespaces.get(*cid).filter(|_| st.clusters.contains_key(*cid)) else {
                return Err(k8s_not_found("clusters", cid));
            };
            if st.disconnected.contains(*cid) {
                // A plain Go error from the dialer: Norman's handler makes it a 500.
                return Err(ApiError::new(500, "ServerError", "cluster agent disconnected"));
            }
            match tail {
                [] => {
                    let visible = nss.values().filter(|n| view.listed(&n.name) && view.namespace(n));
                    Ok((200, list(visible, NAMESPACE_FILTERS, "namespace", req, &ctx)))
                }
                [ns] => {
                    view.may("get", nss.get(*ns).is_some_and(|n| view.namespace(n)), "namespaces", ns)?;
                    nss.get(*ns)
                        .map(|n| (200, n.render(&ctx)))
                        .ok_or_else(|| ApiError::not_found(format!("namespaces \"{ns}\" not found")))
                }
                _ => Err(ApiError::not_found(format!("{} not found", req.path))),
            }
        }
        ("globalroles", []) => {
            allow(req, &[Method::GET])?;
            Ok((
                200,
                list(
                    st.global_roles.values().filter(|r| view.listed(&r.id)),
                    GLOBAL_ROLE_FILTERS,
                    "globalRole",
                    req,
                    &ctx,
                ),
            ))
        }
        ("globalroles", [id]) => {
            allow(req, &[Method::GET])?;
            st.global_roles
                .get(*id)
                .map(|r| (200, r.render(&ctx)))
                .ok_or_else(|| k8s_not_found("globalroles", id))
        }
        ("roletemplates", []) => {
            allow(req, &[Method::GET])?;
            Ok((
                200,
                list(
                    st.role_templates.values().filter(|r| view.listed(&r.id)),
                    ROLE_TEMPLATE_FILTERS,
                    "roleTemplate",
                    req,
                    &ctx,
                ),
            ))
        }
        ("roletemplates", [id]) => {
            allow(req, &[Method::GET])?;
            st.role_templates
                .get(*id)
                .map(|r| (200, r.render(&ctx)))
                .ok_or_else(|| k8s_not_found("roletemplates", id))
        }
        ("users", []) => match (&req.method, action) {
            (&Method::GET, _) => {
                let visible = st.users.values().filter(|u| view.listed(&u.id) && view.user(u));
                Ok((200, list(visible, USER_FILTERS, "user", req, &ctx)))
            }
            (&Method::POST, None) => {
                view.may_create("user")?;
                let user = st.create_user(&req.body_object()?)?;
                Ok((201, user.render(&ctx)))
            }
            (&Method::POST, Some("changepassword")) => {
                let body = req.body_object()?;
                let current = body.get("currentPassword").and_then(Value::as_str).unwrap_or_default();
                if st
                    .users
                    .get(&owner)
                    .is_none_or(|u| u.password.as_deref() != Some(current))
                {
                    return Err(ApiError::invalid_body("Invalid current password"));
                }
                let mut body = body.clone();
                body.remove("currentPassword");
                st.set_password(&owner, &body)?;
                Ok((200, json!({})))
            }
            (&Method::POST, Some(a)) => Err(action_not_available(a)),
            _ => Err(method_error(req)),
        },
        ("users", [id]) => match (&req.method, action) {
            (&Method::GET, _) => {
                view.may("get", *id == owner, "users", id)?;
                st.users
                    .get(*id)
                    .map(|u| (200, u.render(&ctx)))
                    .ok_or_else(|| k8s_not_found("users", id))
            }
            (&Method::PUT, _) => {
                view.may("update", false, "users", id)?;
                let user = st.update_user(id, &req.body_object()?, &owner)?;
                Ok((200, user.render(&ctx)))
            }
            (&Method::DELETE, _) => {
                view.may("delete", false, "users", id)?;
                let user = st.delete_user(id, &owner)?;
                Ok((200, user.render(&ctx)))
            }
            (&Method::POST, Some("setpassword")) => {
                view.may("update", false, "users", id)?;
                let user = st.set_password(id, &req.body_object()?)?;
                Ok((200, user.render(&ctx)))
            }
            (&Method::POST, Some(a)) => {
                if st.users.contains_key(*id) {
                    Err(action_not_available(a))
                } else {
                    Err(k8s_not_found("users", id))
                }
            }
            _ => Err(method_error(req)),
        },
        ("tokens", []) => {
            allow(req, &[Method::GET])?;
            let tokens = if key.ext {
                Vec::new()
            } else {
                vec![token_json(key, &ctx)]
            };
            Ok((200, collection("token", tokens, req, None)))
        }
        ("tokens", [id]) => {
            allow(req, &[Method::GET])?;
            if !key.ext && *id == key.access_key {
                Ok((200, token_json(key, &ctx)))
            } else {
                Err(k8s_not_found("tokens", id))
            }
        }
        ("principals", []) => match (&req.method, action) {
            // The token's user principal, then the groups its provider reports for the user
            // (`pkg/auth/principals/handler.go` list: `GetGroupsForTokenAuthProvider`).
            (&Method::GET, _) => {
                let mut mine: Vec<Value> = st
                    .users
                    .get(&owner)
                    .map(|u| st.user_principal(u).render(&ctx))
                    .into_iter()
                    .collect();
                for g in st.groups_of(&owner) {
                    let mut p = st.group_principal(g).render(&ctx);
                    if let Some(o) = p.as_object_mut() {
                        o.insert("memberOf".into(), Value::Bool(true));
                    }
                    mine.push(p);
                }
                Ok((200, collection("principal", mine, req, None)))
            }
            (&Method::POST, Some("search")) => {
                let body = req.body_object()?;
                let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
                let kind = body
                    .get("principalType")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty());
                let found: Vec<Value> = st
                    .search_principals(name, kind)
                    .iter()
                    .map(|p| p.render(&ctx))
                    .collect();
                Ok((200, collection("principal", found, req, None)))
            }
            (&Method::POST, Some(a)) => Err(action_not_available(a)),
            _ => Err(method_error(req)),
        },
        ("principals", [id]) => {
            allow(req, &[Method::GET])?;
            st.principal(id)
                .map(|p| (200, p.render(&ctx)))
                .ok_or_else(|| ApiError::not_found(format!("principal {id} not found")))
        }
        ("globalrolebindings", rest) => bindings(st, req, &ctx, &view, BindingScope::Global, rest),
        ("clusterroletemplatebindings", rest) => bindings(st, req, &ctx, &view, BindingScope::Cluster, rest),
        ("projectroletemplatebindings", rest) => bindings(st, req, &ctx, &view, BindingScope::Project, rest),
        ("settings", []) => {
            allow(req, &[Method::GET])?;
            let all: Vec<Value> = settings(st)
                .iter()
                .map(|(id, v, d)| setting_json(id, v, d, &ctx))
                .collect();
            Ok((200, collection("setting", all, req, None)))
        }
        ("settings", [id]) => {
            allow(req, &[Method::GET])?;
            settings(st)
                .iter()
                .find(|(sid, _, _)| sid == id)
                .map(|(sid, v, d)| (200, setting_json(sid, v, d, &ctx)))
                .ok_or_else(|| k8s_not_found("settings", id))
        }
        _ => Err(ApiError::not_found(format!("{} not found", req.path))),
    }
}

fn method_error(req: &Req) -> ApiError {
    ApiError::new(405, "MethodNotAllow", format!("Method {} not supported", req.method))
}

fn action_not_available(action: &str) -> ApiError {
    ApiError::new(404, "ActionNotAvailable", format!("action {action} not available"))
}

fn bindings(
    st: &mut store::State,
    req: &Req,
    ctx: &Ctx,
    view: &View,
    scope: BindingScope,
    rest: &[&str],
) -> Result<(u16, Value), ApiError> {
    let (kind, plural, filters) = match scope {
        BindingScope::Global => ("globalRoleBinding", "globalrolebindings", GRB_FILTERS),
        BindingScope::Cluster => (
            "clusterRoleTemplateBinding",
            "clusterroletemplatebindings",
            CRTB_FILTERS,
        ),
        BindingScope::Project => (
            "projectRoleTemplateBinding",
            "projectroletemplatebindings",
            PRTB_FILTERS,
        ),
    };
    match rest {
        [] => match req.method {
            Method::GET => {
                // An exact resource or role narrows the candidates by index (`list` still
                // applies every condition): a lookup, not a scan of every binding.
                let conds = conditions(&req.query, filters);
                let exact = |field: &str| {
                    conds
                        .iter()
                        .find(|c| c.field == field && c.modifier == Modifier::Eq && c.values.len() == 1)
                        .map(|c| c.values[0].as_str())
                };
                let (resource, role) = match scope {
                    BindingScope::Global => (None, exact("globalRoleId")),
                    BindingScope::Cluster => (exact("clusterId"), exact("roleTemplateId")),
                    BindingScope::Project => (exact("projectId"), exact("roleTemplateId")),
                };
                let map = st.binding_map(scope);
                let candidates: Box<dyn Iterator<Item = &store::Binding>> = match map.candidates(resource, role) {
                    Some(found) => Box::new(found),
                    None => Box::new(map.values()),
                };
                let visible = candidates.filter(|b| view.listed(&b.id) && view.binding(b));
                Ok((200, list(visible, filters, kind, req, ctx)))
            }
            Method::POST => {
                view.may_create(binding_schema(scope))?;
                let b = st.create_binding(scope, &req.body_object()?)?;
                Ok((201, b.render(ctx)))
            }
            _ => Err(method_error(req)),
        },
        [id] => {
            let name = id.split_once(':').map_or(*id, |(_, n)| n);
            match req.method {
                Method::GET => {
                    let allowed = st.binding_map(scope).get(*id).is_some_and(|b| view.binding(b));
                    view.may("get", allowed, plural, id)?;
                    st.binding_map(scope)
                        .get(*id)
                        .map(|b| (200, b.render(ctx)))
                        .ok_or_else(|| k8s_not_found(plural, name))
                }
                Method::PUT => {
                    view.may("update", false, plural, id)?;
                    let b = st.update_binding(scope, id, &req.body_object()?)?;
                    Ok((200, b.render(ctx)))
                }
                Method::DELETE => {
                    view.may("delete", false, plural, id)?;
                    st.delete_binding(scope, id).map(|b| (200, b.render(ctx)))
                }
                _ => Err(method_error(req)),
            }
        }
        _ => Err(ApiError::not_found(format!("{} not found", req.path))),
    }
}

fn api_root(ctx: &Ctx) -> Value {
    let mut links = Map::new();
    links.insert("self".into(), Value::String(format!("{}/v3", ctx.base)));
    for c in [
        "clusters",
        "projects",
        "globalRoles",
        "roleTemplates",
        "users",
        "tokens",
        "principals",
        "globalRoleBindings",
        "clusterRoleTemplateBindings",
        "projectRoleTemplateBindings",
        "settings",
    ] {
        links.insert(c.into(), Value::String(format!("{}/v3/{c}", ctx.base)));
    }
    json!({
        "apiVersion": {"group": "management.cattle.io", "path": "/v3", "version": "v3"},
        "baseType": "apiRoot",
        "type": "apiRoot",
        "id": "v3",
        "links": links,
    })
}

fn token_json(key: &KeyState, ctx: &Ctx) -> Value {
    let now = ctx.clock;
    let ttl = key
        .expires_at
        .map_or(0, |t| (t - key.created).num_milliseconds().max(0));
    json!({
        "type": "token",
        "baseType": "token",
        "id": key.access_key,
        "name": key.access_key,
        "userId": key.owner,
        "userPrincipal": format!("local://{}", key.owner),
        "authProvider": "local",
        "clusterId": key.cluster_id,
        "created": key.created.to_rfc3339_opts(SecondsFormat::Secs, true),
        "expiresAt": key.expires_at.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)).unwrap_or_default(),
        "expired": key.expires_at.is_some_and(|t| t <= now),
        "enabled": true,
        "current": true,
        "isDerived": true,
        "ttl": ttl,
        "description": "simulator API key",
        "links": {"self": format!("{}/v3/tokens/{}", ctx.base, key.access_key)},
    })
}

/// An ext token as `GET /v1/ext.cattle.io.tokens/{name}` shows it (rancher
/// `pkg/apis/ext.cattle.io/v1/types.go`: `spec.ttl` in ms, `status.expiresAt` empty when it never
/// expires), wrapped by Steve (`id`, `type`, `links`).
fn ext_token_json(key: &KeyState, st: &store::State, base: &str) -> Value {
    let now = st.now_utc();
    let ttl = key
        .expires_at
        .map_or(0, |t| (t - key.created).num_milliseconds().max(0));
    let owner = st.users.get(&key.owner);
    json!({
        "id": key.access_key,
        "type": "ext.cattle.io.token",
        "links": {"self": format!("{base}/v1/ext.cattle.io.tokens/{}", key.access_key)},
        "apiVersion": "ext.cattle.io/v1",
        "kind": "Token",
        "metadata": {
            "name": key.access_key,
            "creationTimestamp": key.created.to_rfc3339_opts(SecondsFormat::Secs, true),
        },
        "spec": {
            "userID": key.owner,
            "description": "simulator API key",
            "clusterName": key.cluster_id.clone().unwrap_or_default(),
            "ttl": ttl,
            "enabled": true,
            "kind": "",
        },
        "status": {
            "current": true,
            "expired": key.expires_at.is_some_and(|t| t <= now),
            "expiresAt": key.expires_at.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)).unwrap_or_default(),
            "authProvider": "local",
            "displayName": owner.map(|u| u.name.clone()).unwrap_or_default(),
            "userName": owner.and_then(|u| u.username.clone()).unwrap_or_default(),
            "lastUpdateTime": "",
        },
    })
}

fn settings(st: &store::State) -> Vec<(String, String, String)> {
    vec![
        ("auth-token-max-ttl-minutes".into(), "129600".into(), "129600".into()),
        (
            "password-min-length".into(),
            st.password_min_length.to_string(),
            "12".into(),
        ),
        ("server-version".into(), format!("v{}.0", st.version), String::new()),
    ]
}

fn setting_json(id: &str, value: &str, default: &str, ctx: &Ctx) -> Value {
    json!({
        "type": "setting",
        "baseType": "setting",
        "id": id,
        "name": id,
        "value": value,
        "default": default,
        "customized": false,
        "source": "",
        "links": {"self": format!("{}/v3/settings/{id}", ctx.base)},
    })
}

// ----- Norman collections -----

#[derive(Debug, Clone, Copy, PartialEq)]
enum Modifier {
    Eq,
    Ne,
    In,
    NotIn,
}

impl Modifier {
    /// The modifiers a field of this kind takes; `null`/`notnull` exist in Norman's condition
    /// code but no field is given them, so they are ignored like any unknown modifier.
    fn parse(s: &str, kind: Kind) -> Option<Modifier> {
        Some(match (s, kind) {
            ("eq", _) => Modifier::Eq,
            ("ne", _) => Modifier::Ne,
            ("in", Str) => Modifier::In,
            ("notin", Str) => Modifier::NotIn,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Modifier::Eq => "eq",
            Modifier::Ne => "ne",
            Modifier::In => "in",
            Modifier::NotIn => "notin",
        }
    }
}

/// One query key's condition (rancher/norman `types/condition.go`): `eq`/`ne` compare the first
/// value given for the key, `in`/`notin` the set; a null field compares as "".
struct Condition {
    key: String,
    field: &'static str,
    modifier: Modifier,
    values: Vec<String>,
}

impl Condition {
    fn matches(&self, value: Option<Cow<'_, str>>) -> bool {
        let v = value.as_deref().unwrap_or_default();
        let first = self.values.first().map(String::as_str).unwrap_or_default();
        match self.modifier {
            Modifier::Eq => first == v,
            Modifier::Ne => first != v,
            Modifier::In => self.values.iter().any(|x| x == v),
            Modifier::NotIn => !self.values.iter().any(|x| x == v),
        }
    }
}

/// The query's conditions, parsed as rancher/norman `parse/collection.go` does: the key splits
/// on its **last** `_` into field and modifier (`userId_notin`); a field that is not filterable
/// or a modifier its type does not take is silently ignored.
fn conditions(query: &[(String, String)], filters: &[Filter]) -> Vec<Condition> {
    let mut out: Vec<Condition> = Vec::new();
    for (k, v) in query {
        let (name, op) = match k.rfind('_') {
            Some(i) if i > 0 => (&k[..i], &k[i + 1..]),
            _ => (k.as_str(), "eq"),
        };
        let Some((field, kind)) = filters.iter().copied().find(|(f, _)| *f == name) else {
            continue;
        };
        let Some(modifier) = Modifier::parse(op, kind) else {
            continue;
        };
        match out.iter_mut().find(|c| c.key == *k) {
            Some(c) => c.values.push(v.clone()),
            None => out.push(Condition {
                key: k.clone(),
                field,
                modifier,
                values: vec![v.clone()],
            }),
        }
    }
    out
}

const DEFAULT_LIMIT: i64 = 1000;
const MAX_LIMIT: i64 = 10_000;

fn limit_of(req: &Req) -> i64 {
    match req.param("limit").map(|l| l.trim().parse::<i64>()) {
        Some(Ok(-1)) => MAX_LIMIT,
        Some(Ok(l)) if l > MAX_LIMIT => MAX_LIMIT,
        Some(Ok(l)) if l >= 0 => l,
        _ => DEFAULT_LIMIT,
    }
}

/// Norman's list: filter, sort (by `id` unless `sort=`), then slice from `marker` (restarting at
/// item 0 when the marker id is not in the list), with `next` as a full URL.
fn list<'a, T: Item + 'a>(
    items: impl Iterator<Item = &'a T>,
    filters: &[Filter],
    resource_type: &str,
    req: &Req,
    ctx: &Ctx,
) -> Value {
    let conds = conditions(&req.query, filters);
    let mut matched: Vec<&T> = items
        .filter(|_| !req.empty_list)
        .filter(|it| conds.iter().all(|c| c.matches(it.field(c.field, ctx))))
        .collect();
    let sort = req
        .param("sort")
        .and_then(|s| filters.iter().map(|(f, _)| *f).find(|f| *f == s && *f != "id"));
    if let Some(field) = sort {
        matched.sort_by_cached_key(|it| it.field(field, ctx).map(Cow::into_owned).unwrap_or_default());
    }
    let desc = req.param("order") == Some("desc");
    if desc {
        matched.reverse();
    }

    let limit = limit_of(req);
    let total = matched.len() as i64;
    let mut pagination = Map::new();
    let marker = req.param("marker").filter(|m| !m.is_empty());
    if let Some(m) = marker {
        pagination.insert("marker".into(), Value::String(m.to_string()));
    }
    pagination.insert("limit".into(), Value::from(limit));
    pagination.insert("total".into(), Value::from(total));
    let mut page: &[&T] = &[];
    if total > 0 {
        let start = marker
            .and_then(|m| matched.iter().position(|it| it.id() == m))
            .unwrap_or(0) as i64;
        let previous = (start - limit).max(0);
        let next = (start + limit).min(total);
        let link = |i: i64| Value::String(req.url_with(Some(matched[i as usize].id())));
        if previous < start {
            pagination.insert("previous".into(), link(previous));
        }
        if next > start && next < total {
            pagination.insert("next".into(), link(next));
        }
        if start > 0 || next < total {
            pagination.insert("partial".into(), Value::Bool(true));
            pagination.insert("first".into(), link(0));
            let last = total - limit;
            if last > 0 && last < total {
                pagination.insert("last".into(), link(last));
            }
        }
        page = &matched[start as usize..next as usize];
    }
    let mut data = Vec::with_capacity(page.len() * 1024);
    for (i, it) in page.iter().enumerate() {
        if i > 0 {
            data.push(b',');
        }
        it.write(ctx, &mut data);
    }
    *req.page.borrow_mut() = Some(data);

    let mut filter_json = Map::new();
    for (f, _) in filters {
        let given: Vec<Value> = conds
            .iter()
            .filter(|c| c.field == *f)
            .flat_map(|c| {
                c.values
                    .iter()
                    .map(|v| json!({"modifier": c.modifier.name(), "value": v}))
            })
            .collect();
        filter_json.insert(
            (*f).to_string(),
            if given.is_empty() {
                Value::Null
            } else {
                Value::Array(given)
            },
        );
    }
    let sort_json = json!({"name": sort.unwrap_or("id"), "order": if desc { "desc" } else { "asc" }});
    let mut v = collection(resource_type, Vec::new(), req, Some(Value::Object(pagination)));
    if let Some(obj) = v.as_object_mut() {
        obj.remove("data");
    }
    if let Some(obj) = v.as_object_mut() {
        obj.insert("filters".into(), Value::Object(filter_json));
        obj.insert("sort".into(), sort_json);
    }
    v
}

fn collection(resource_type: &str, data: Vec<Value>, req: &Req, pagination: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), Value::String("collection".into()));
    m.insert("links".into(), json!({"self": req.current_url()}));
    m.insert("createTypes".into(), json!({}));
    m.insert("actions".into(), json!({}));
    if let Some(p) = pagination {
        m.insert("pagination".into(), p);
    }
    m.insert("resourceType".into(), Value::String(resource_type.into()));
    m.insert("data".into(), Value::Array(data));
    Value::Object(m)
}
