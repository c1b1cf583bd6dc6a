//! The TTL cache in front of every store, with singleflight.
//!
//! One slot per reference. A fetch takes the slot's async lock: whoever comes first calls the store,
//! and whoever waited behind it takes that outcome (success or error) instead of calling again. That
//! is the singleflight, and it needs no extra bookkeeping: a waiter knows the outcome is new to it
//! because it was completed after the waiter arrived. A success is then reused until the TTL runs
//! out; an error is never reused by a later caller.

use std::collections::HashMap;
use std::future::Future;
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
    /// std `Mutex`: held only to find or create a slot, never across an await.
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl Cache {
    pub(super) fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
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
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
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
        let outcome = fetch().await;
        slot.last = Some((outcome.clone(), Instant::now()));
        (outcome, false)
    }

    /// Drops the slot: the next fetch calls the store. A fetch already running keeps its own slot,
    /// so its (possibly stale) outcome is not reused by later callers.
    pub(super) fn invalidate(&self, key: &str) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}
