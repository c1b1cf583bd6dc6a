//! A scripted remote control plane for process tests of the real binary: it answers the session
//! hello, hands out the lease answers it is given (job lists or malformed bodies), then short
//! empty long-polls, and records every `/jobs/{id}:{verb}` call and every path the protocol does
//! not have.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What the fake control plane saw.
#[derive(Default)]
pub struct Seen {
    /// Lease answers still to give, in order: a job list (as JSON text) or a malformed body.
    pub answers: VecDeque<String>,
    /// `(job id, verb, body)` of every `/jobs/{id}:{verb}` call.
    pub actions: Vec<(String, String, Value)>,
    /// Calls to paths the protocol does not have (a job id that escaped its path segment).
    pub unexpected: Vec<String>,
}

impl Seen {
    /// `(job id, body)` of every completion, in order.
    pub fn completions(&self) -> Vec<(String, Value)> {
        self.actions
            .iter()
            .filter(|(_, verb, _)| verb == "complete")
            .map(|(id, _, body)| (id.clone(), body.clone()))
            .collect()
    }
}

pub type Shared = Arc<Mutex<Seen>>;

async fn hello() -> Response {
    axum::Json(json!({"session_id": "s-scripted", "lease_seconds": 60})).into_response()
}

async fn lease(State(seen): State<Shared>) -> Response {
    let next = seen.lock().expect("lock").answers.pop_front();
    match next {
        Some(body) => ([("content-type", "application/json")], body).into_response(),
        None => {
            // Drained: a short long-poll, so the agent idles without spinning.
            tokio::time::sleep(Duration::from_millis(200)).await;
            axum::Json(json!({"jobs": []})).into_response()
        }
    }
}

async fn job_action(State(seen): State<Shared>, Path(action): Path<String>, body: Bytes) -> Response {
    let Some((id, verb)) = action.rsplit_once(':') else {
        seen.lock().expect("lock").unexpected.push(format!("/jobs/{action}"));
        return StatusCode::NOT_FOUND.into_response();
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.lock()
        .expect("lock")
        .actions
        .push((id.to_string(), verb.to_string(), body));
    match verb {
        "renew" => {
            axum::Json(json!({"lease_expires_at": chrono::Utc::now() + chrono::Duration::seconds(60)})).into_response()
        }
        "complete" | "release" => StatusCode::NO_CONTENT.into_response(),
        _ => {
            seen.lock().expect("lock").unexpected.push(format!("/jobs/{action}"));
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

async fn upload() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn unexpected(State(seen): State<Shared>, uri: Uri) -> StatusCode {
    seen.lock().expect("lock").unexpected.push(uri.to_string());
    StatusCode::NOT_FOUND
}

/// Serves `app` on a free loopback port; its `http://` base URL.
pub async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    format!("http://{addr}")
}

/// A control plane that hands out `answers` in order; its URL and what it saw.
pub async fn start(answers: impl IntoIterator<Item = String>) -> (String, Shared) {
    let seen: Shared = Arc::new(Mutex::new(Seen {
        answers: answers.into_iter().collect(),
        ..Seen::default()
    }));
    let url = serve(
        Router::new()
            .route("/connector/v1/connectors/{id}/sessions", post(hello))
            .route("/connector/v1/connectors/{id}/jobs:lease", post(lease))
            .route("/connector/v1/jobs/{action}", post(job_action))
            .route("/connector/v1/jobs/{action}/resources", post(upload))
            .fallback(unexpected)
            .with_state(seen.clone()),
    )
    .await;
    (url, seen)
}
