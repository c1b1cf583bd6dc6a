//! The scheduler at scale (issue 18): accesses ending together are handed out as revokes at once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::tests::{access_create, complete_ok, grant_result, lease_one, open_with, options};
use super::*;
use crate::control_plane::store::db::p;
use crate::control_plane::store::testing::{TestBackend, backends, current};
use serde_json::json;

/// A control plane whose scheduler ticks once an hour: whatever it ends on time, it ended at an
/// expiry, not at a tick.
fn hour_tick(dir: &std::path::Path) -> Arc<EmbeddedControlPlane> {
    open_with(
        Options {
            tick: Duration::from_secs(3600),
            lease_duration: Duration::from_secs(600),
            ..options(dir)
        },
        json!({}),
    )
}

/// `n` accesses (`user0`, ...; TTL an hour) granted as an agent would, 100 a lease; their ids.
async fn granted(cp: &EmbeddedControlPlane, n: usize) -> Vec<String> {
    let ids = (0..n)
        .map(|i| {
            cp.create_access(access_create(&format!("user{i}"), 3600, false))
                .unwrap()
                .id
        })
        .collect();
    loop {
        let grants = cp
            .lease(&LeaseRequest {
                max_jobs: 100,
                wait_seconds: 0,
            })
            .await
            .unwrap();
        if grants.is_empty() {
            break;
        }
        for g in grants {
            let job: Job = serde_json::from_value(g).unwrap();
            let user = job.params["user"].as_str().unwrap().to_string();
            complete_ok(cp, &job, grant_result(&format!("u-{user}"), false, None)).await;
        }
    }
    ids
}

backends! {
/// 1,000 accesses due at the same instant are all leased (as revokes) within one second of it,
/// by an agent long-polling as the real one does (100 jobs a lease), although the scheduler's
/// tick is an hour away: it wakes at the earliest expiry and ends them in a few transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_accesses_due_at_the_same_instant_are_all_leased_within_one_second_of_it() {
    const N: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let cp = hour_tick(dir.path());
    let ids: HashSet<String> = granted(&cp, N).await.into_iter().collect();
    // The TTL runs from each grant, so the test puts every expiry on one instant, 1.5 s ahead.
    let due =
        DateTime::from_timestamp_millis((now() + chrono::Duration::milliseconds(1500)).timestamp_millis()).unwrap();
    let updated = cp
        .store
        .lock()
        .unwrap()
        .exec(
            "UPDATE access_requests SET expires_at = ?1 WHERE state = 'active'",
            &p![due.timestamp_millis()],
        )
        .unwrap();
    assert_eq!(updated, N);

    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(cp.clone().run_scheduler(stop.clone()));
    let (mut leased, mut first, mut last) = (0usize, None, chrono::Duration::zero());
    let deadline = Instant::now() + Duration::from_secs(60);
    while leased < N && Instant::now() < deadline {
        let jobs = cp
            .lease(&LeaseRequest {
                max_jobs: 100,
                wait_seconds: 1,
            })
            .await
            .unwrap();
        let at = now() - due;
        if std::env::var_os("SCHED_TRACE").is_some() {
            eprintln!("lease at {} ms: {} jobs", at.num_milliseconds(), jobs.len());
        }
        for v in jobs {
            let job: Job = serde_json::from_value(v).unwrap();
            assert_eq!(job.kind, "revoke");
            assert!(at >= chrono::Duration::zero(), "a revoke before its expiry: {at}");
            leased += 1;
            first.get_or_insert(at);
            last = last.max(at);
        }
    }
    stop.cancel();
    let _ = scheduler.await;
    eprintln!(
        "{N} revokes due at one instant: first leased {} ms after it, last {} ms",
        first.unwrap_or_default().num_milliseconds(),
        last.num_milliseconds()
    );
    assert_eq!(leased, N, "revokes leased within 60 s");
    // The figure is for the built agent. An unoptimised test build does the same store
    // work per access ending several times slower, on 2 cores shared with other builds: there
    // the bound is looser, and still far below the scheduler's tick.
    // PostgreSQL: each read is a round trip to the server (writes are pipelined), a few times
    // SQLite's cost in a release build (0.5-0.75 s against 0.12-0.2 s here); the bound leaves
    // room for an unoptimised build on a loaded machine, and the figure is the benchmark's.
    let postgres = current() == TestBackend::Postgres;
    let bound = match (cfg!(debug_assertions), postgres) {
        (false, false) => 1,
        (true, false) => 10,
        (_, true) => 30,
    };
    assert!(
        last <= chrono::Duration::seconds(bound),
        "the last of {N} revokes was leased {} ms after their expiry (bound {bound} s)",
        last.num_milliseconds()
    );
    assert!(
        ids.iter()
            .all(|id| cp.access(id).unwrap().unwrap().state == AccessState::Revoking)
    );
}

/// Expiries a millisecond apart, with the tick an hour away: each one is ended as it falls due.
/// The next expiry often falls due while a pass runs, after the pass read the clock; the
/// scheduler once took that for a pass that had failed and slept until the tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_that_falls_due_during_a_pass_is_ended_at_once_not_at_the_next_tick() {
    const N: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let cp = hour_tick(dir.path());
    let ids = granted(&cp, N).await;
    // The scheduler's first pass (at its start) finds nothing due; then the expiries come one
    // millisecond apart, from 1 s ahead.
    let first = now().timestamp_millis() + 1000;
    {
        let c = cp.store.lock().unwrap();
        for (i, id) in ids.iter().enumerate() {
            c.exec(
                "UPDATE access_requests SET expires_at = ?1 WHERE id = ?2",
                &p![first + i as i64, id.as_str()],
            )
            .unwrap();
        }
    }
    let last_due = DateTime::from_timestamp_millis(first + N as i64 - 1).unwrap();
    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(cp.clone().run_scheduler(stop.clone()));
    // Far less than the tick; loose enough for an unoptimised build on a loaded machine.
    let deadline = last_due + chrono::Duration::seconds(20);
    let ended = |cp: &EmbeddedControlPlane| {
        ids.iter()
            .filter(|id| cp.access(id).unwrap().unwrap().state == AccessState::Revoking)
            .count()
    };
    while ended(&cp) < N && now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at = now() - last_due;
    stop.cancel();
    let _ = scheduler.await;
    assert_eq!(
        ended(&cp),
        N,
        "accesses ended {} ms after the last expiry (the tick is an hour away)",
        at.num_milliseconds()
    );
}
}

backends! {
/// The scheduler sleeps until the earliest expiry it knows (the tick is an hour away); a grant
/// whose access ends sooner wakes it, one that ends later does not need to (it looks again at the
/// earlier one and then sees the later): each access ends within a moment of its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_that_end_sooner_or_later_than_the_scheduler_looks_all_end_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let cp = hour_tick(dir.path());
    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(cp.clone().run_scheduler(stop.clone()));
    // Let its first pass run and its sleep start (until the tick: nothing expires yet).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Granted in this order: 3 s (wakes it: sooner than the tick), 1 s (sooner than 3 s: wakes
    // it again), 2 s (later than 1 s: it looks at 1 s and then finds this one).
    let mut ids = Vec::new();
    for (i, ttl) in [3u64, 1, 2].into_iter().enumerate() {
        let id = cp.create_access(access_create(&format!("user{i}"), ttl, false)).unwrap().id;
        let job = lease_one(&cp, 0).await.expect("the grant");
        let mut result = grant_result(&format!("u-user{i}"), false, None);
        result["binding_ids"] = json!([format!("c-1:crtb-apono-{i}")]);
        complete_ok(&cp, &job, result).await;
        ids.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ended_at: Vec<Option<DateTime<Utc>>> = vec![None; ids.len()];
    while ended_at.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, id) in ids.iter().enumerate() {
            if ended_at[i].is_none() && cp.access(id).unwrap().unwrap().state != AccessState::Active {
                ended_at[i] = Some(now());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = scheduler.await;
    for (i, id) in ids.iter().enumerate() {
        let a = cp.access(id).unwrap().unwrap();
        let expires = a.expires_at.expect("an expiry");
        let ended = ended_at[i].unwrap_or_else(|| panic!("access {i} did not end within 30 s (tick an hour)"));
        assert_eq!(a.state, AccessState::Revoking, "access {i}");
        // Seen within a poll (20 ms) of its end; the bound leaves room for a loaded machine.
        let late = ended - expires;
        assert!(
            late >= chrono::Duration::zero() && late <= chrono::Duration::milliseconds(1500),
            "access {i} (TTL {}) ended {} ms after its expiry",
            a.ttl_seconds,
            late.num_milliseconds()
        );
    }
}
}
