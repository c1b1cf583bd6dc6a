//! The TTL cache in front of every store, with singleflight.
//!
//! One slot per reference. A fetch takes the slot's async lock: whoever comes first calls the store,
//! and whoever waited behind it takes that outcome (success or error) instead of calling again. That
//! is the singleflight, and it needs no extra bookkeeping: a waiter knows the outcome is new to it
//! because it was completed after the waiter arrived. A success is then reused until the TTL runs
//! out; an error is never reused by a later caller.
//!
//! Values live only as long as they may be reused: a success is dropped from its slot when its TTL
//! runs out (a timer per fetch), so a rotated-away or no-longer-used key does not stay in memory.
//! Slots left empty are removed from the map whenever a new slot is made.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Secret, SecretError};

type Outcome = Result<Secret, SecretError>;

#[derive(Default)]
struct Slot {
    /// The last outcome and when it completed.
    last: Option<(Outcome, Instant)>,
}

pub(super) struct Cache {
    ttl: Duration,
    /// The id of the last store read (its successes carry it as [`Secret::read_id`]).
    reads: AtomicU64,
    /// std `Mutex`: held only to find or create a slot, never across an await.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl Cache {
    pub(super) fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            reads: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        // A slot nobody else holds and that keeps no reusable secret can go.
        let ttl = self.ttl;
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot
                    .try_lock()
                    .map_or(true, |s| matches!(&s.last, Some((Ok(_), at)) if at.elapsed() < ttl))
        });
        slots.entry(key.to_string()).or_default().clone()
    }

    /// The cached secret when fresh, else the outcome of `fetch` (called at most once across
    /// concurrent callers). The flag says whether the store was spared a call.
    pub(super) async fn get_or_fetch<F, Fut>(&self, key: &str, fetch: F) -> (Outcome, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome>,
    {
        let arrived = Instant::now();
        let key_slot = self.slot(key);
        let mut slot = key_slot.lock().await;
        if let Some((outcome, at)) = &slot.last {
            // Completed while we waited for the lock: the singleflight leader's outcome.
            if *at >= arrived {
                return (outcome.clone(), true);
            }
            if let Ok(secret) = outcome
                && at.elapsed() < self.ttl
            {
                return (Ok(secret.clone()), true);
            }
        }
        let read = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        let outcome = fetch().await.map(|mut secret| {
            secret.read = read;
            secret
        });
        let done = Instant::now();
        slot.last = Some((outcome.clone(), done));
        drop(slot);
        if outcome.is_ok() {
            self.evict_after_ttl(&key_slot, done);
        }
        (outcome, false)
    }

    /// Drops the secret completed at `done` from `slot` once the TTL runs out (unless a newer
    /// fetch replaced it). The timer holds no strong reference: an invalidated slot is freed.
    fn evict_after_ttl(&self, slot: &Arc<tokio::sync::Mutex<Slot>>, done: Instant) {
        let slot = Arc::downgrade(slot);
        let Some(at) = eviction_time(done, self.ttl) else {
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let Some(slot) = slot.upgrade() else { return };
            let mut slot = slot.lock().await;
            if matches!(&slot.last, Some((_, at)) if *at == done) {
                slot.last = None;
            }
        });
    }

    /// How many slots hold a secret (tests: eviction).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .values()
            .filter(|s| s.try_lock().map_or(true, |s| matches!(s.last, Some((Ok(_), _)))))
            .count()
    }

    /// Drops the slot: the next fetch calls the store. A fetch already running keeps its own slot,
    /// so its (possibly stale) outcome is not reused by later callers.
    pub(super) fn invalidate(&self, key: &str) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Drops the slot only when it still holds the read `read`; true when dropped. A busy slot is
    /// kept: its fetch under way replaces the refused copy anyway.
    pub(super) fn invalidate_read(&self, key: &str, read: u64) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = slots.get(key) else {
            return false;
        };
        let holds_it = slot
            .try_lock()
            .is_ok_and(|s| matches!(&s.last, Some((Ok(secret), _)) if secret.read == read));
        if holds_it {
            slots.remove(key);
        }
        holds_it
    }
}

/// When a secret completed at `done` is dropped. `None` for a TTL past what an `Instant` can
/// hold (a mistyped setting): never evicted, and no overflow panic in the timer task (secrets
/// review N18).
fn eviction_time(done: Instant, ttl: Duration) -> Option<Instant> {
    done.checked_add(ttl)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn an_absurd_ttl_sets_no_timer_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(
            eviction_time(now, Duration::from_secs(60)),
            Some(now + Duration::from_secs(60))
        );
        assert_eq!(
            eviction_time(now, Duration::from_secs(10_000_000_000_000_000_000)),
            None
        );
    }

    use secrecy::SecretString;

    use super::*;

    fn secret(v: &str) -> Secret {
        Secret::new(BTreeMap::from([(
            "token".to_string(),
            SecretString::from(v.to_string()),
        )]))
    }

    /// Waits (bounded generously, never asserting on speed) until `done` holds.
    async fn eventually(done: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        done()
    }

    #[tokio::test]
    async fn an_expired_secret_is_evicted_without_another_read() {
        let cache = Cache::new(Duration::from_millis(50));
        let (outcome, _) = cache.get_or_fetch("a", || async { Ok(secret("old")) }).await;
        assert!(outcome.is_ok());
        assert_eq!(cache.held(), 1);
        assert!(
            eventually(|| cache.held() == 0).await,
            "the expired secret is still held"
        );
    }

    #[tokio::test]
    async fn a_fresh_secret_is_kept_and_empty_slots_are_removed() {
        let cache = Cache::new(Duration::from_secs(3600));
        let (first, _) = cache.get_or_fetch("kept", || async { Ok(secret("v")) }).await;
        assert!(first.is_ok());
        let (_, spared) = cache.get_or_fetch("kept", || async { Ok(secret("other")) }).await;
        assert!(spared, "a fresh secret is reused");
        let gone: Outcome = Err(SecretError::NotFound {
            reference: "x".into(),
            hint: "h".into(),
        });
        let (failed, _) = cache.get_or_fetch("failed", || async { gone }).await;
        assert!(failed.is_err());
        // Making a new slot sweeps the one that holds only an error.
        let (new, _) = cache.get_or_fetch("new", || async { Ok(secret("n")) }).await;
        assert!(new.is_ok());
        let keys: Vec<String> = cache.slots.lock().unwrap().keys().cloned().collect();
        assert!(
            keys.contains(&"kept".to_string()) && !keys.contains(&"failed".to_string()),
            "{keys:?}"
        );
    }
}
