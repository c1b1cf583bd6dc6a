//! The accept loop behind every port the daemon serves (health, operator API, agent protocol),
//! hardened against clients that connect and never finish (reliability review F9, security
//! review N3):
//!
//! - a connection must send its first byte within [`Limits::first_byte_timeout`], and a request's
//!   headers must arrive within [`Limits::header_read_timeout`]; an idle keep-alive connection is
//!   closed after the same time (hyper restarts the header timer when a connection goes idle);
//! - at most [`Limits::max_connections`] are open at once, and at most [`Limits::max_per_peer`]
//!   from one IP address. When a new connection would pass either cap, the connection that has
//!   waited longest for a request (no handler running: silent, half-sent headers, or idle
//!   keep-alive) is closed to make room: the peer's own when it is at its cap, else one of the
//!   peer holding the most; only when no such connection waits is the newcomer closed instead.
//!   A client holding sockets open therefore cannot starve a probe from another address: its own
//!   sockets are the ones that give way (`/healthz` answers with hundreds held open);
//! - an accept error (EMFILE, ENFILE, ENOBUFS) backs off briefly and is logged at most once per
//!   [`LOG_EVERY`], so it neither spins a core nor floods the log;
//! - on shutdown, idle connections close at once, open requests get [`Limits::shutdown_grace`],
//!   then everything is dropped: no client can delay SIGTERM.
//!
//! Request bodies are the router's business: `control_plane::server` checks the token before it
//! reads one and bounds its size and time.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the accept loop pauses after an accept error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one warning per this interval for refused connections and for accept errors.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What one server allows its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time for a new connection to send its first byte: real clients write at once.
    pub first_byte_timeout: Duration,
    /// Time for a request's headers to arrive, and for an idle keep-alive connection to send the
    /// next request.
    pub header_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_per_peer: usize,
    /// After shutdown, how long open requests may still run before their connections are dropped.
    pub shutdown_grace: Duration,
}

impl Limits {
    /// The health port: probes and Prometheus scrapes need few connections and quick answers.
    pub const HEALTH: Limits = Limits {
        first_byte_timeout: Duration::from_secs(2),
        header_read_timeout: Duration::from_secs(5),
        max_connections: 128,
        max_per_peer: 32,
        shutdown_grace: Duration::from_secs(1),
    };

    /// The control-plane ports (operator API, agent protocol). Long-polls hold a connection while
    /// they wait, which the header timeout does not count: it runs only while headers are due.
    /// The per-peer cap is generous because agents behind one proxy or mesh sidecar share an
    /// address, and a stranger cannot hold a slot busy: it is refused before its body is read.
    pub const API: Limits = Limits {
        first_byte_timeout: Duration::from_secs(2),
        header_read_timeout: Duration::from_secs(10),
        max_connections: 1024,
        max_per_peer: 256,
        shutdown_grace: Duration::from_secs(3),
    };
}

/// Serves `router` on `listener` over HTTP/1.1 until `shutdown` is cancelled, within `limits`.
/// Handlers can read the peer address as `ConnectInfo<SocketAddr>`. Returns at most
/// `limits.shutdown_grace` (plus a little) after `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: CancellationToken) {
    let slots = Arc::new(Slots::new(limits));
    let connections = TaskTracker::new();
    let mut refused = Throttled::new();
    let mut evicted = Throttled::new();
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
        let slot = match slots.admit(peer.ip()) {
            Admission::Admitted(slot) => slot,
            Admission::AdmittedByClosing(slot) => {
                if let Some(more) = evicted.tick() {
                    tracing::warn!(
                        listen = ?local, max_connections = limits.max_connections, max_per_peer = limits.max_per_peer,
                        repeated = more,
                        "connection limit reached: closed the connection that waited longest for a request"
                    );
                }
                slot
            }
            Admission::Refused => {
                drop(stream);
                if let Some(more) = refused.tick() {
                    tracing::warn!(
                        listen = ?local, max_connections = limits.max_connections, max_per_peer = limits.max_per_peer,
                        repeated = more,
                        "connection limit reached and every connection is serving a request: closing new connections"
                    );
                }
                continue;
            }
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            router.clone(),
            limits,
            shutdown.clone(),
            slot,
        ));
    }
    connections.close();
    // Each connection ends itself within the grace; the extra second only covers scheduling.
    let deadline = limits.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(deadline, connections.wait()).await.is_err() {
        tracing::warn!(listen = ?local, "connections still open after the shutdown grace; leaving them");
    }
}

/// One open connection as the slot table sees it.
struct Connection {
    /// Requests whose handler is running (0 or 1 with HTTP/1.1).
    busy: AtomicUsize,
    /// Milliseconds since the table's epoch at which it last started waiting for a request.
    waiting_since: AtomicU64,
    /// Cancelled to close the connection and give its slot to a newcomer.
    close: CancellationToken,
}

/// The open connections, by id, with their peers: who may come in, and who gives way.
struct Slots {
    limits: Limits,
    epoch: Instant,
    table: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    open: HashMap<u64, (IpAddr, Arc<Connection>)>,
}

enum Admission {
    Admitted(Slot),
    /// Admitted after closing the connection that had waited longest for a request.
    AdmittedByClosing(Slot),
    /// Every connection that could give way is running a handler.
    Refused,
}

/// The soft limit on open files (`ulimit -n`), from Linux's `/proc/self/limits`; `None` when
/// unlimited or unknown.
fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `limits` with the caps kept to a quarter of `open_files` (at least 16 connections): past the
/// descriptor limit accept fails before a cap is reached, and then no held connection gives way.
fn within_open_files(limits: Limits, open_files: Option<u64>) -> Limits {
    let Some(open_files) = open_files else {
        return limits;
    };
    let fair = usize::try_from(open_files / 4).unwrap_or(usize::MAX).max(16);
    Limits {
        max_connections: limits.max_connections.min(fair),
        max_per_peer: limits.max_per_peer.min(fair),
        ..limits
    }
}

impl Slots {
    fn new(limits: Limits) -> Slots {
        Slots {
            limits: within_open_files(limits, open_files_limit()),
            epoch: Instant::now(),
            table: Mutex::new(SlotTable::default()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes a slot for a connection from `peer`, closing the longest-waiting idle connection
    /// (of that peer when it is at its own cap, of anyone when the server is full) if needed.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Admission {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut per_peer: HashMap<IpAddr, usize> = HashMap::new();
        for (ip, _) in table.open.values() {
            *per_peer.entry(*ip).or_default() += 1;
        }
        let from_peer = per_peer.get(&peer).copied().unwrap_or(0);
        // The connection of `of` (anyone's when `None`) that has waited longest for a request.
        let victim_of = |of: Option<IpAddr>, table: &SlotTable| {
            table
                .open
                .iter()
                .filter(|(_, (ip, c))| of.is_none_or(|of| *ip == of) && c.busy.load(Ordering::Acquire) == 0)
                .min_by_key(|(_, (_, c))| c.waiting_since.load(Ordering::Acquire))
                .map(|(id, _)| *id)
        };
        let victim = if from_peer >= self.limits.max_per_peer {
            // A peer at its cap makes room among its own connections only.
            Some(victim_of(Some(peer), &table))
        } else if table.open.len() >= self.limits.max_connections {
            // Full: the peer holding the most gives way first, so many sockets from a few
            // addresses do not push out a probe from another.
            let greediest = per_peer.iter().max_by_key(|(_, n)| **n).map(|(ip, _)| *ip);
            Some(victim_of(greediest, &table).or_else(|| victim_of(None, &table)))
        } else {
            None
        };
        let closed_one = match victim {
            None => false,
            Some(None) => return Admission::Refused,
            Some(Some(id)) => {
                if let Some((_, c)) = table.open.remove(&id) {
                    c.close.cancel();
                }
                true
            }
        };
        let id = table.next_id;
        table.next_id += 1;
        let connection = Arc::new(Connection {
            busy: AtomicUsize::new(0),
            waiting_since: AtomicU64::new(self.now_ms()),
            close: CancellationToken::new(),
        });
        table.open.insert(id, (peer, connection.clone()));
        let slot = Slot {
            slots: self.clone(),
            id,
            connection,
        };
        if closed_one {
            Admission::AdmittedByClosing(slot)
        } else {
            Admission::Admitted(slot)
        }
    }
}

/// A connection's place in [`Slots`], given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    connection: Arc<Connection>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.slots.table.lock().unwrap_or_else(|p| p.into_inner());
        table.open.remove(&self.id);
    }
}

/// Marks a connection busy while a handler runs; idle again (waiting from now) when dropped.
struct Busy {
    slots: Arc<Slots>,
    connection: Arc<Connection>,
}

impl Busy {
    fn new(slots: Arc<Slots>, connection: Arc<Connection>) -> Busy {
        connection.busy.fetch_add(1, Ordering::AcqRel);
        Busy { slots, connection }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.connection
            .waiting_since
            .store(self.slots.now_ms(), Ordering::Release);
        self.connection.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    slot: Slot,
) {
    let close = slot.connection.close.clone();
    // Nothing is parsed before the first byte: a silent client costs a slot for this long only.
    let mut first = [0u8; 1];
    tokio::select! {
        read = tokio::time::timeout(limits.first_byte_timeout, stream.peek(&mut first)) => match read {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        },
        () = close.cancelled() => return,
        () = shutdown.cancelled() => return,
    }
    let inner = TowerToHyperService::new(router);
    let (slots, connection) = (slot.slots.clone(), slot.connection.clone());
    let service = service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let busy = Busy::new(slots.clone(), connection.clone());
        let answer = inner.call(request);
        async move {
            let answer = answer.await;
            drop(busy);
            answer
        }
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
        // Given way to a newcomer: dropping the connection closes the socket.
        () = close.cancelled() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            // Dropping the connection (on timeout) closes the socket, whatever the client does.
            let _ = tokio::time::timeout(limits.shutdown_grace, connection).await;
        }
    }
    drop(slot);
}

/// Errors that concern one connection only; the listener is fine.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

/// Lets one log line through per [`LOG_EVERY`], counting the ones held back.
pub(crate) struct Throttled {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttled {
    pub(crate) fn new() -> Throttled {
        Throttled {
            last: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when a line should be logged now, `n` being how many were held back since the last.
    pub(crate) fn tick(&mut self) -> Option<u64> {
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
