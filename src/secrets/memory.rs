//! An in-memory store for tests (this crate's and other modules'), standing in for any store type.
//!
//! Always compiled and public: it has no dependencies, holds only what a test puts in it, and is
//! never registered unless a caller passes it to [`super::SecretStores::with_store`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;

use super::{Secret, SecretError, SecretRef, SecretStore};

/// Serves references of one store type from memory. A test changes a value with [`MemoryStore::set`]
/// (a rotation) or makes the next reads fail with [`MemoryStore::fail_with`], and counts the calls
/// that reached the store with [`MemoryStore::calls`] (cache hits do not reach it).
pub struct MemoryStore {
    store_type: &'static str,
    values: Mutex<HashMap<String, Result<Secret, SecretError>>>,
    calls: AtomicU64,
    delay: Mutex<Duration>,
}

impl MemoryStore {
    /// A store answering references of `store_type` (`"AWS"`, `"KUBERNETES"`, ...). Unknown
    /// references answer `NotFound`.
    pub fn new(store_type: &'static str) -> MemoryStore {
        MemoryStore {
            store_type,
            values: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
            delay: Mutex::new(Duration::ZERO),
        }
    }

    /// Sets (or rotates) the secret behind `reference`.
    pub fn set<K: Into<String>, V: Into<String>>(
        &self,
        reference: &SecretRef,
        values: impl IntoIterator<Item = (K, V)>,
    ) {
        let map: BTreeMap<String, SecretString> = values
            .into_iter()
            .map(|(k, v)| (k.into(), SecretString::from(v.into())))
            .collect();
        self.lock().insert(reference.describe(), Ok(Secret::new(map)));
    }

    /// Makes reads of `reference` fail with `error`.
    pub fn fail_with(&self, reference: &SecretRef, error: SecretError) {
        self.lock().insert(reference.describe(), Err(error));
    }

    /// Removes the secret behind `reference`.
    pub fn remove(&self, reference: &SecretRef) {
        self.lock().remove(&reference.describe());
    }

    /// Calls that reached this store.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Makes every read take `delay` (to test concurrent fetches).
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Result<Secret, SecretError>>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl SecretStore for MemoryStore {
    fn store_type(&self) -> &'static str {
        self.store_type
    }

    async fn fetch(&self, reference: &SecretRef) -> Result<Secret, SecretError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let delay = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.lock().get(&reference.describe()).cloned().unwrap_or_else(|| {
            Err(SecretError::NotFound {
                reference: reference.describe(),
                hint: "no such secret in the in-memory store".into(),
            })
        })
    }
}
