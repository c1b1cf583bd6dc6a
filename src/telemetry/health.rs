//! The operator's HTTP endpoints on `APONO_HEALTH_ADDR`: `/healthz` (the process is alive),
//! `/readyz` (connected to the control plane and serving jobs), `/metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::metrics::metrics;
use super::serve::Limits;

/// Whether the agent is ready, and if not, why. Shared by the agent (which sets it) and the
/// health server (which reports it).
#[derive(Clone, Default)]
pub struct Readiness {
    state: Arc<Mutex<Option<String>>>,
}

const STARTING: &str = "starting: no session with the control plane yet";

impl Readiness {
    pub fn new() -> Readiness {
        Readiness {
            state: Arc::new(Mutex::new(Some(STARTING.to_string()))),
        }
    }

    pub fn set_ready(&self) {
        if let Ok(mut s) = self.state.lock() {
            *s = None;
        }
        metrics().ready.set(1);
    }

    /// Not ready, with a reason shown on `/readyz`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        if let Ok(mut s) = self.state.lock() {
            *s = Some(reason.into());
        }
        metrics().ready.set(0);
    }

    /// `Ok` when ready, else the reason.
    pub fn status(&self) -> Result<(), String> {
        match self.state.lock() {
            Ok(s) => match &*s {
                None => Ok(()),
                Some(reason) => Err(reason.clone()),
            },
            Err(_) => Err("readiness state unavailable".into()),
        }
    }
}

pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    match readiness.status() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics().encode(),
    )
}

/// The running health server; [`HealthServer::stop`] ends it.
pub struct HealthServer {
    /// The bound address (port 0 picks one).
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    /// Stops serving and waits for the server to end: at most [`Limits::HEALTH`]'s shutdown grace
    /// (plus a second), whatever the clients do.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` until stopped, within
/// [`Limits::HEALTH`]: the port is often reachable from the whole network, so a client that never
/// finishes a request neither holds the process at exit nor uses up its file descriptors.
///
/// # Errors
/// The address cannot be bound (in use, or not an address of this host).
pub async fn serve(addr: SocketAddr, readiness: Readiness) -> std::io::Result<HealthServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(super::serve::serve(
        listener,
        router(readiness),
        Limits::HEALTH,
        stop.clone(),
    ));
    Ok(HealthServer {
        addr: bound,
        stop,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_answer_and_readiness_follows_the_agent() {
        let readiness = Readiness::new();
        let server = serve("127.0.0.1:0".parse().unwrap(), readiness.clone()).await.unwrap();
        let addr = server.addr;
        let get = |path: &'static str| async move {
            let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(get("/healthz").await.0, 200);
        let (status, body) = get("/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("no session"), "{body}");
        readiness.set_ready();
        assert_eq!(get("/readyz").await.0, 200);
        readiness.set_not_ready("the control plane refused the token");
        let (status, body) = get("/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("refused the token"));
        let (status, body) = get("/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("apono_connector_ready"), "{body}");
        server.stop().await;
    }
}
