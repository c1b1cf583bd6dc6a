//! The memory budget shared by every answer being read (security review 2, N7): answers past it
//! wait, then fail with an error naming it; bytes come back when an answer is done.

use axum::body::Body;
use axum::response::Response;
use futures::StreamExt as _;

use super::super::budget::BodyBudget;
use super::*;

/// A server whose every answer is `size` bytes of a JSON collection (announced by
/// `Content-Length`), sent as `first` bytes at once, then the rest after `stall` (an answer still
/// arriving holds its bytes meanwhile).
async fn slow_big_answers(size: usize, first: usize, stall: Duration) -> String {
    let app = axum::Router::new().fallback(move || async move {
        let head = b"{\"data\":[],\"pad\":\"".to_vec();
        let pad = size - head.len() - 2;
        let mut body = head;
        body.extend(std::iter::repeat_n(b'x', pad));
        body.extend_from_slice(b"\"}");
        let rest = body.split_off(first);
        let chunks = futures::stream::iter([Ok::<_, std::io::Error>(body), Ok(rest)]).then(move |c| async move {
            if c.as_ref().is_ok_and(|c| c.first() != Some(&b'{')) {
                tokio::time::sleep(stall).await;
            }
            c
        });
        Response::builder()
            .header("content-type", "application/json")
            .header("content-length", size)
            .body(Body::from_stream(chunks))
            .unwrap()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn read(c: &Client) -> Result<Value, client::ApiError> {
    let url = c.url(&["v3", "users"], &[]).unwrap();
    c.get::<Value>(url).await
}

#[tokio::test]
async fn answers_read_at_once_share_one_budget_and_past_it_a_job_fails_naming_it() {
    const KIB: usize = 1 << 10;
    let host = slow_big_answers(400 * KIB, 200 * KIB, Duration::from_millis(600)).await;
    let budget = BodyBudget::new(512 * KIB, Duration::from_millis(150));
    let config = RancherConfig::from_value(&json!({"host": host, "page_size": 50})).unwrap();
    let key = ApiKey::from_secret(&secret(&[("token", "token-abc:canary")])).unwrap();
    let client = || Client::new(&config, &key).unwrap().with_budget(budget.clone());
    let (a, b) = (client(), client());
    let (first, second) = tokio::join!(read(&a), async {
        // The first answer is under way and holds its share when the second arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        read(&b).await
    });
    let (ok, over) = match (first, second) {
        (Ok(v), Err(e)) | (Err(e), Ok(v)) => (v, e),
        other => panic!("one answer read and one over the budget, got {other:?}"),
    };
    assert_eq!(ok["pad"].as_str().map(str::len), Some(400 * KIB - 20));
    assert!(matches!(*over.kind, ErrorKind::OverBudget { .. }), "{over:?}");
    assert!(!over.is_transient(), "not fetched again at once");
    let e = over.into_error();
    assert!(e.retryable(), "the job retries later: {e:?}");
    let m = e.to_string();
    assert!(m.contains("memory budget") && m.contains("512 KiB"), "{m}");
    assert!(m.contains("page_size") && m.contains("50"), "{m}");
    assert_eq!(budget.in_use(), 0, "every byte is given back once answers are decoded");

    // Alone, the same answer is read within the same budget.
    let v = read(&b).await.unwrap();
    assert_eq!(v["pad"].as_str().map(str::len), Some(400 * KIB - 20));
    assert_eq!(budget.in_use(), 0);
}
