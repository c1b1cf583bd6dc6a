//! What the dashboard and the alerts read from the control plane's state: accesses not ended by
//! state (`apono_connector_accesses{state}`), those past their expiry and not yet revoked
//! (`apono_connector_accesses_overdue`), jobs waiting to be handed out by kind
//! (`apono_connector_jobs_queued{kind}`), all set once per scheduler tick by two aggregate
//! queries on indexed columns (no row is decoded, so a mass expiry costs nothing extra); and
//! the revoke lag (`apono_connector_revoke_lag_seconds`: revoke done minus expiry), observed when
//! a revoke ends an access. Every state and kind is set, to 0 when there is none, so a series
//! exists before the first access and drops to 0 instead of going stale.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::store::db::p;
use super::store::{AccessRow, Db, StoreError, corrupt, sql, to_ms};
use crate::control_plane::operator::AccessState;
use crate::control_plane::protocol::JobKind;
use crate::telemetry::metrics::{KindLabels, StateLabels, metrics};

/// The states of an access that has not ended.
const LIVE: [AccessState; 3] = [AccessState::Pending, AccessState::Active, AccessState::Revoking];

/// One reading of the state.
#[derive(Debug, Default, PartialEq)]
struct Counts {
    /// Accesses not ended, by state (`pending`, `active`, `revoking`).
    accesses: HashMap<String, i64>,
    /// Active or revoking accesses whose expiry is at or before `now`: access still held that
    /// should not be.
    overdue: i64,
    /// Pending jobs (queued or in backoff) by kind.
    queued: HashMap<String, i64>,
}

fn read(c: &dyn Db, now: DateTime<Utc>) -> Result<Counts, StoreError> {
    let mut counts = Counts::default();
    let rows = c
        .query(
            "SELECT state, COUNT(*), SUM(CASE WHEN state <> 'pending' AND expires_at <= ?1 THEN 1 ELSE 0 END) \
             FROM access_requests WHERE state IN ('pending', 'active', 'revoking') GROUP BY state",
            &p![to_ms(now)],
        )
        .map_err(sql("counting accesses by state"))?;
    for row in rows {
        let state: String = row.get(0).map_err(|e| corrupt("access_requests", "(count)", e))?;
        let n: i64 = row.get(1).map_err(|e| corrupt("access_requests", "(count)", e))?;
        let overdue: Option<i64> = row.get(2).map_err(|e| corrupt("access_requests", "(count)", e))?;
        counts.overdue += overdue.unwrap_or(0);
        counts.accesses.insert(state, n);
    }
    let rows = c
        .query(
            "SELECT kind, COUNT(*) FROM jobs WHERE state = 'pending' GROUP BY kind",
            &[],
        )
        .map_err(sql("counting queued jobs"))?;
    for row in rows {
        let kind: String = row.get(0).map_err(|e| corrupt("jobs", "(count)", e))?;
        let n: i64 = row.get(1).map_err(|e| corrupt("jobs", "(count)", e))?;
        counts.queued.insert(kind, n);
    }
    Ok(counts)
}

/// Sets the access and queue gauges from the state (once per scheduler tick). A failed read is
/// logged and the gauges keep their last values until the next tick.
pub(super) fn update(c: &dyn Db, now: DateTime<Utc>) {
    let counts = match read(c, now) {
        Ok(counts) => counts,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the access and job counts for the metrics; retrying next tick");
            return;
        }
    };
    let m = metrics();
    for state in LIVE.map(AccessState::as_str) {
        let n = counts.accesses.get(state).copied().unwrap_or(0);
        m.accesses.get_or_create(&StateLabels { state: state.into() }).set(n);
    }
    m.accesses_overdue.set(counts.overdue);
    // Known kinds always; a kind this build does not know (a newer writer's) as it is.
    let kinds = JobKind::ALL.map(|k| k.as_str().to_string());
    for kind in kinds.iter().chain(counts.queued.keys().filter(|k| !kinds.contains(k))) {
        let n = counts.queued.get(kind).copied().unwrap_or(0);
        m.jobs_queued.get_or_create(&KindLabels { kind: kind.clone() }).set(n);
    }
}

/// How long after its expiry an access was revoked; `None` for an access revoked before it
/// expired (an early `access revoke`) or one with no expiry.
fn lag(expires_at: Option<DateTime<Utc>>, revoked_at: Option<DateTime<Utc>>) -> Option<Duration> {
    (revoked_at? - expires_at?).to_std().ok()
}

/// Observes the revoke lag of `a` once a revoke has ended it.
pub(super) fn revoke_done(a: &AccessRow) {
    if a.state == AccessState::Revoked
        && let Some(lag) = lag(a.expires_at, a.revoked_at)
    {
        metrics().revoke_lag.observe(lag.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{access_create, complete_ok, lease_all, open_with, options};
    use super::*;
    use crate::control_plane::operator::AccessRequestCreate;
    use crate::control_plane::store::testing::backends;
    use serde_json::json;

    fn counts(cp: &super::super::EmbeddedControlPlane) -> Counts {
        read(&*cp.store.lock().expect("store"), Utc::now()).expect("read counts")
    }

    fn map(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    backends! {
    #[tokio::test]
    async fn accesses_by_state_overdue_and_queue_follow_an_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = open_with(options(dir.path()), json!({}));
        assert_eq!(counts(&cp), Counts::default(), "nothing yet");

        let long = cp.create_access(access_create("alice", 3600, false)).expect("create");
        // Another role, so bob's binding is his own (not handed over to alice's access).
        let short = cp
            .create_access(AccessRequestCreate {
                role: "cluster-owner".into(),
                ..access_create("bob", 1, false)
            })
            .expect("create");
        assert_eq!(
            counts(&cp),
            Counts {
                accesses: map(&[("pending", 2)]),
                overdue: 0,
                queued: map(&[("grant", 2)]),
            },
            "two grants queued"
        );

        for (i, job) in lease_all(&cp).await.iter().enumerate() {
            let result =
                json!({"user_id": format!("u-{i}"), "binding_ids": [format!("c-1:crtb-{i}")], "created_user": false});
            complete_ok(&cp, job, result).await;
        }
        let c = counts(&cp);
        assert_eq!(
            (c.accesses, c.queued),
            (map(&[("active", 2)]), map(&[])),
            "both granted"
        );

        // bob's access runs out; until the scheduler ends it, it is overdue.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(counts(&cp).overdue, 1, "bob is past his expiry and still holds access");
        cp.tick_once().expect("tick");
        let c = counts(&cp);
        assert_eq!(
            (c.accesses, c.overdue, c.queued),
            (map(&[("active", 1), ("revoking", 1)]), 1, map(&[("revoke", 1)])),
            "the revoke is queued; access is still held until it is done"
        );

        let revoke = lease_all(&cp).await;
        assert_eq!(revoke.len(), 1);
        let removed = revoke[0].params["binding_ids"].clone();
        complete_ok(&cp, &revoke[0], json!({ "removed_binding_ids": removed })).await;
        let c = counts(&cp);
        assert_eq!(
            (c.accesses, c.overdue),
            (map(&[("active", 1)]), 0),
            "bob revoked: nothing overdue"
        );

        let bob = cp.access(&short.id).expect("read").expect("bob");
        let bob_lag = lag(bob.expires_at, bob.revoked_at).expect("revoked after expiry");
        assert!(
            bob_lag >= Duration::from_millis(100) && bob_lag < Duration::from_secs(30),
            "{bob_lag:?}"
        );
        let text = metrics().encode();
        assert!(
            text.lines()
                .any(|l| l.starts_with("apono_connector_revoke_lag_seconds_count ") && !l.ends_with(" 0")),
            "the revoke's lag was observed:\n{text}"
        );

        // An early revoke has no lag after expiry.
        cp.revoke_access(&long.id).expect("revoke");
        let revoke = lease_all(&cp).await;
        let removed = revoke[0].params["binding_ids"].clone();
        complete_ok(&cp, &revoke[0], json!({ "removed_binding_ids": removed })).await;
        let alice = cp.access(&long.id).expect("read").expect("alice");
        assert_eq!(alice.state, AccessState::Revoked);
        assert_eq!(
            lag(alice.expires_at, alice.revoked_at),
            None,
            "revoked before its expiry"
        );
    }

    }

    #[test]
    fn gauges_show_every_state_and_kind_at_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp = open_with(options(dir.path()), json!({}));
        update(&*cp.store.lock().expect("store"), Utc::now());
        let text = metrics().encode();
        for needle in [
            "apono_connector_accesses{state=\"pending\"}",
            "apono_connector_accesses{state=\"active\"}",
            "apono_connector_accesses{state=\"revoking\"}",
            "apono_connector_accesses_overdue ",
            "apono_connector_jobs_queued{kind=\"revoke\"}",
            "apono_connector_jobs_queued{kind=\"sweep\"}",
            "apono_connector_revoke_lag_seconds_bucket{le=",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }
}
