use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Limits, Throttled, serve, within_open_files};

/// Guards a test against hanging; far longer than any limit under test.
const GUARD: Duration = Duration::from_secs(20);

struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(limits: Limits) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/ok", get(|| async { "ok" }))
        .route("/hang", get(std::future::pending::<&'static str>))
        .route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(listener, app, limits, stop.clone()));
    Running { addr, stop, task }
}

fn limits(header_read_timeout: Duration, max_connections: usize) -> Limits {
    Limits {
        first_byte_timeout: header_read_timeout,
        header_read_timeout,
        max_connections,
        max_per_peer: max_connections,
        shutdown_grace: Duration::from_millis(200),
    }
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(GUARD, stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&buf).into_owned()
}

async fn get_path(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A refused connection may be closed before the request is written: that reads as "".
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    read_to_close(&mut s).await
}

#[tokio::test]
async fn a_half_open_request_is_closed_after_the_header_timeout() {
    let server = start(limits(Duration::from_millis(300), 8)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let answer = read_to_close(&mut s).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    // The server still serves others.
    assert!(get_path(server.addr, "/ok").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_silent_or_idle_keep_alive_connection_is_closed() {
    let server = start(limits(Duration::from_millis(300), 8)).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    read_to_close(&mut silent).await;

    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn held_open_connections_give_way_to_a_new_request() {
    let server = start(limits(Duration::from_secs(60), 2)).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        // A half request: accepted, it holds a slot until someone needs it.
        s.write_all(b"GET /ok HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // Twenty held against two slots: each new request closes the one that waited longest.
    for _ in 0..5 {
        let answer = tokio::time::timeout(GUARD, get_path(server.addr, "/ok")).await;
        assert!(
            answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
            "{answer:?}"
        );
    }
    // The early holders were closed.
    let first = read_to_close(&mut held[0]).await;
    assert!(!first.contains("200 OK"), "{first}");
}

#[tokio::test]
async fn one_peer_cannot_take_every_slot_and_busy_slots_are_kept() {
    let server = start(Limits {
        max_per_peer: 1,
        ..limits(Duration::from_secs(60), 8)
    })
    .await;
    // A handler that never answers keeps its slot: a newcomer from the same peer is refused.
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Until its handler runs it is only waiting, and would give way.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = tokio::time::timeout(GUARD, async {
        loop {
            if get_path(server.addr, "/ok").await.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "a second connection from one peer was served past max_per_peer = 1"
    );
    drop(busy);
    let served = tokio::time::timeout(GUARD, async {
        loop {
            if get_path(server.addr, "/ok").await.starts_with("HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(served.is_ok(), "a freed slot was not reused");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_first_byte_timeout() {
    let server = start(Limits {
        first_byte_timeout: Duration::from_millis(200),
        ..limits(Duration::from_secs(60), 8)
    })
    .await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let started = std::time::Instant::now();
    read_to_close(&mut silent).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

#[tokio::test]
async fn shutdown_is_not_held_by_a_half_open_request() {
    let server = start(limits(Duration::from_secs(3600), 8)).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // Let the server accept it before it is told to stop.
    assert!(get_path(server.addr, "/ok").await.starts_with("HTTP/1.1 200"));
    server.stop.cancel();
    let ended = tokio::time::timeout(GUARD, server.task).await;
    assert!(ended.is_ok(), "serve still running with a half-open client");
    read_to_close(&mut s).await;
}

#[tokio::test]
async fn handlers_see_the_peer_address() {
    let server = start(limits(Duration::from_secs(5), 8)).await;
    let answer = get_path(server.addr, "/peer").await;
    assert!(answer.contains("127.0.0.1:"), "{answer}");
}

#[test]
fn throttled_logs_once_per_interval_and_counts_the_rest() {
    let mut t = Throttled::new();
    assert_eq!(t.tick(), Some(0));
    assert_eq!(t.tick(), None);
    assert_eq!(t.tick(), None);
    t.last = t.last.and_then(|l| l.checked_sub(super::LOG_EVERY));
    assert_eq!(t.tick(), Some(2));
}

#[test]
fn caps_stay_below_the_open_files_limit() {
    let low = within_open_files(Limits::API, Some(128));
    assert_eq!((low.max_connections, low.max_per_peer), (32, 32));
    assert_eq!(within_open_files(Limits::HEALTH, Some(1 << 20)), Limits::HEALTH);
    assert_eq!(within_open_files(Limits::API, None), Limits::API);
    assert_eq!(within_open_files(Limits::API, Some(8)).max_connections, 16);
    assert!(super::open_files_limit().is_none_or(|n| n > 0));
}
