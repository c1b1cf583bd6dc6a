//! The accept loop behind every port the daemon serves (health, operator API, agent protocol),
//! hardened against clients that connect and never finish (reliability review F9):
//!
//! - a request's headers must arrive within [`Limits::header_read_timeout`], and an idle
//!   keep-alive connection is closed after the same time (hyper restarts the header timer when a
//!   connection goes idle), so a silent or half-open client holds a slot for a bounded time;
//! - at most [`Limits::max_connections`] are open at once; one more is accepted and closed at
//!   once, so the kernel backlog drains and the process never holds more descriptors than the cap;
//! - an accept error (EMFILE, ENFILE, ENOBUFS) backs off briefly and is logged at most once per
//!   [`LOG_EVERY`], so it neither spins a core nor floods the log;
//! - on shutdown, idle connections close at once, open requests get [`Limits::shutdown_grace`],
//!   then everything is dropped: no client can delay SIGTERM.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the accept loop pauses after an accept error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one warning per this interval for refused connections and for accept errors.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What one server allows its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time for a request's headers to arrive, and for an idle keep-alive connection to send the
    /// next request.
    pub header_read_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// After shutdown, how long open requests may still run before their connections are dropped.
    pub shutdown_grace: Duration,
}

impl Limits {
    /// The health port: probes and Prometheus scrapes need few connections and quick answers.
    pub const HEALTH: Limits = Limits {
        header_read_timeout: Duration::from_secs(5),
        max_connections: 32,
        shutdown_grace: Duration::from_secs(1),
    };

    /// The control-plane ports (operator API, agent protocol). Long-polls hold a connection while
    /// they wait, which the header timeout does not count: it runs only while headers are due.
    pub const API: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        max_connections: 256,
        shutdown_grace: Duration::from_secs(3),
    };
}

/// Serves `router` on `listener` over HTTP/1.1 until `shutdown` is cancelled, within `limits`.
/// Handlers can read the peer address as `ConnectInfo<SocketAddr>`. Returns at most
/// `limits.shutdown_grace` (plus a little) after `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut refused = Throttled::new();
    let mut accept_errors = Throttled::new();
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // The client gave up between connect and accept: nothing is wrong with us.
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                if let Some(more) = accept_errors.tick() {
                    tracing::warn!(
                        listen = ?local, error = %e, repeated = more,
                        "cannot accept connections (out of file descriptors? raise `ulimit -n`); retrying"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream);
            if let Some(more) = refused.tick() {
                tracing::warn!(
                    listen = ?local, max_connections = limits.max_connections, repeated = more,
                    "connection limit reached: closing new connections"
                );
            }
            continue;
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            router.clone(),
            limits,
            shutdown.clone(),
            permit,
        ));
    }
    connections.close();
    // Each connection ends itself within the grace; the extra second only covers scheduling.
    let deadline = limits.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(deadline, connections.wait()).await.is_err() {
        tracing::warn!(listen = ?local, "connections still open after the shutdown grace; leaving them");
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let inner = TowerToHyperService::new(router);
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        inner.call(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
        }
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            // Dropping the connection (on timeout) closes the socket, whatever the client does.
            let _ = tokio::time::timeout(limits.shutdown_grace, connection).await;
        }
    }
}

/// Errors that concern one connection only; the listener is fine.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// Lets one log line through per [`LOG_EVERY`], counting the ones held back.
struct Throttled {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttled {
    fn new() -> Throttled {
        Throttled {
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when a line should be logged now, `n` being how many were held back since the last.
    fn tick(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                self.held_back = self.held_back.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests;
