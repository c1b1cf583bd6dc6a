//! Tests on both backends: a real PostgreSQL server for the test process, one database per test
//! (so tests run in parallel), and `backends!`, which runs a test once on SQLite and once on
//! PostgreSQL.
//!
//! The server is Debian's `postgresql` (`tests/run` installs it): `initdb` and `pg_ctl` in a
//! temporary directory, as the `postgres` user when the tests run as root (PostgreSQL refuses
//! root), on a free loopback port. Under `CI=true` a missing server fails the PostgreSQL half of
//! each test; elsewhere it is skipped with a loud line.

use std::path::Path;
use std::sync::OnceLock;

use secrecy::SecretString;

// One server harness for the library's tests and the process tests in `tests/`.
#[path = "../../../tests/common/postgres.rs"]
mod server;
pub use server::PgServer;

/// Which backend the running test uses (set by `backends!`; SQLite outside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    Sqlite,
    Postgres,
}

tokio::task_local! {
    pub static BACKEND: TestBackend;
}

/// The backend of the running test.
pub fn current() -> TestBackend {
    BACKEND.try_with(|b| *b).unwrap_or(TestBackend::Sqlite)
}

/// The database URL for a test's `data_dir` on the running backend: `None` on SQLite; on
/// PostgreSQL a database of its own, named after the directory (so reopening the same dir, a
/// "restart", finds the same state).
pub fn database_url_for(dir: &Path) -> Option<SecretString> {
    match current() {
        TestBackend::Sqlite => None,
        TestBackend::Postgres => {
            let server = shared().expect("PostgreSQL is available (checked by backends!)");
            Some(server.database(&database_name(dir)))
        }
    }
}

fn database_name(dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    format!("t_{}", &hex::encode(digest)[..24])
}

/// Whether the PostgreSQL half of a test can run. `false` (skipped, said on stderr) when no
/// server can be started here; under `CI=true` that panics instead.
pub fn postgres_available() -> bool {
    if cfg!(not(feature = "store-postgres")) {
        eprintln!("*** SKIPPED the PostgreSQL half: built without the store-postgres feature ***");
        return false;
    }
    match shared() {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and PostgreSQL cannot run: {e}")
        }
        Err(e) => {
            eprintln!("*** SKIPPED the PostgreSQL half: {e} ***");
            false
        }
    }
}

/// The test process's server, started on first use. It is stopped when the process exits by a
/// small watcher (statics are never dropped), by its own data directory and pid.
pub fn shared() -> Result<&'static PgServer, String> {
    static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let server = PgServer::start()?;
            server.stop_when_process_exits();
            Ok(server)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs each test once on SQLite (`NAME::sqlite`) and once on PostgreSQL (`NAME::postgres`):
/// `options(dir)` in the test gives the backend's state (see [`database_url_for`]).
macro_rules! backends {
    ($( $(#[$attr:meta])* async fn $name:ident() $body:block )*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $(#[$attr])*
            async fn sqlite() {
                $crate::control_plane::store::testing::BACKEND
                    .scope($crate::control_plane::store::testing::TestBackend::Sqlite, async $body)
                    .await
            }

            $(#[$attr])*
            async fn postgres() {
                if !$crate::control_plane::store::testing::postgres_available() {
                    return;
                }
                $crate::control_plane::store::testing::BACKEND
                    .scope($crate::control_plane::store::testing::TestBackend::Postgres, async $body)
                    .await
            }
        }
    )*};
}
pub(crate) use backends;
