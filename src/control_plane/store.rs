//! SQLite state of the embedded control plane: integrations, jobs, access requests, agent-created
//! users (rotation and cleanup schedules) and uploaded discovery objects.
//!
//! This module is storage only: rows in, rows out. The rules (leases, retries, the access state
//! machine) live in `embedded`, which runs each multi-step change in one transaction while it
//! holds the connection's lock.
//!
//! Why a `std::sync::Mutex<Connection>` and not a pool or `spawn_blocking`: every statement here
//! touches a handful of rows by key or by a small indexed scan, so holding the lock across an
//! `.await` never happens and each call is short (microseconds to a millisecond). One connection
//! also makes every transaction serial, which is what the lease logic wants.
//!
//! **Architecture invariant:** no secret a grant generates is written here in clear: `embedded`
//! strips `credentials` from results before they reach [`JobRow::result`] (on PostgreSQL it keeps
//! them sealed in `one_time_credentials` until their first read). The one secret this file can
//! hold is an inline `APONO` integration's credentials, which is why it is created with mode 0600.

pub mod db;
#[cfg(feature = "store-postgres")]
pub mod postgres;
#[cfg(all(test, unix))]
mod subject_tests;
#[cfg(test)]
pub mod testing;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde_json::Value;

pub use db::Db;
use db::{DbError, DbRow, Val, p, query_opt};

use super::ControlPlaneError;
use super::data_dir::{DataDirError, check_writable, create_dir, create_private_file, lock_data_dir};
use super::operator::{AccessState, JobState};
use super::protocol::JobError;
use crate::integrations::{BindingScope, BoundSubject, Owner, Resource, Subject, ids};

/// Version of the schema below. Bump it and add a migration step in [`migrate`] when it changes.
pub const SCHEMA_VERSION: i64 = 6;

/// Name of the state file inside `data_dir`.
pub const DB_FILE: &str = "control-plane.sqlite3";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS integrations (
    name        TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    source      TEXT NOT NULL DEFAULT 'config'
);
CREATE TABLE IF NOT EXISTS jobs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    kind              TEXT NOT NULL,
    integration_name  TEXT,
    integration       TEXT,
    params            TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempt           INTEGER NOT NULL,
    lease_token       TEXT,
    lease_expires_at  INTEGER,
    not_before        INTEGER,
    completed_token   TEXT,
    result            TEXT,
    error             TEXT,
    access_id         TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, not_before, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, (CASE kind WHEN 'revoke' THEN 0 WHEN 'grant' THEN 1 ELSE 2 END), seq);
CREATE TABLE IF NOT EXISTS access_requests (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    integration       TEXT NOT NULL,
    subject           TEXT NOT NULL,
    role              TEXT NOT NULL,
    resource          TEXT NOT NULL,
    ttl_seconds       INTEGER NOT NULL,
    create_user       INTEGER NOT NULL,
    state             TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    granted_at        INTEGER,
    expires_at        INTEGER,
    revoked_at        INTEGER,
    grant_job_id      TEXT NOT NULL,
    revoke_job_id     TEXT,
    user_id           TEXT,
    binding_ids       TEXT NOT NULL,
    access_details    TEXT,
    last_error        TEXT,
    revoke_requested  INTEGER NOT NULL DEFAULT 0,
    integration_spec  TEXT,
    pre_existing      INTEGER NOT NULL DEFAULT 0,
    bound_subject     TEXT,
    owner             TEXT,
    note              TEXT,
    subject_name      TEXT,
    subject_key       TEXT
);
CREATE INDEX IF NOT EXISTS access_due ON access_requests (state, expires_at);
CREATE INDEX IF NOT EXISTS access_subject_name ON access_requests (subject_name);
CREATE INDEX IF NOT EXISTS access_subject_key ON access_requests (subject_key);
CREATE INDEX IF NOT EXISTS jobs_access ON jobs (access_id, kind);
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS managed_users (
    integration       TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    next_rotation_at  INTEGER,
    cleanup_at        INTEGER,
    PRIMARY KEY (integration, user_id)
);
CREATE TABLE IF NOT EXISTS resources (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    object  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS resources_job ON resources (job_id, seq);
";

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Db {
        context: String,
        #[source]
        source: DbError,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A row that does not decode: reported with the table and key so it can be inspected.
    #[error("corrupt {table} row {key}: {message}")]
    Corrupt {
        table: &'static str,
        key: String,
        message: String,
    },
    #[error("{0}")]
    Version(String),
    /// Another process (or another instance in this one) holds the data directory's lock.
    #[error("{0}")]
    InUse(String),
    /// The data dir is not writable, or a state file is readable by others: the path and the fix.
    #[error("{0}")]
    Unsafe(String),
    /// The database setting is wrong (the message names what, never the password).
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// The key of a corrupt row, when known.
    pub fn corrupt_key(&self) -> Option<&str> {
        match self {
            StoreError::Corrupt { key, .. } if key != "?" => Some(key),
            _ => None,
        }
    }

    /// Whether the database was unreachable or busy (an outage: retry later), as opposed to a
    /// wrong row, statement or setting.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Db { source, .. } if source.is_transient())
    }
}

impl From<StoreError> for ControlPlaneError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InUse(message) => ControlPlaneError::InUse { message },
            // The database is down or busy: an outage (503, retried), not a broken state.
            e if e.is_transient() => ControlPlaneError::Unavailable { message: e.to_string() },
            e => ControlPlaneError::Store { message: e.to_string() },
        }
    }
}

impl From<DataDirError> for StoreError {
    fn from(e: DataDirError) -> Self {
        match e {
            DataDirError::Io { context, source } => StoreError::Io { context, source },
            DataDirError::InUse(message) => StoreError::InUse(message),
            DataDirError::Unsafe(message) => StoreError::Unsafe(message),
        }
    }
}

/// Shorthand for wrapping a driver error with what was being done.
pub fn sql<E: Into<DbError>>(context: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |source| StoreError::Db {
        context: context.to_string(),
        source: source.into(),
    }
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `data_dir/control-plane.sqlite3`, locked by one process.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by any number of replicas.
    #[cfg(feature = "store-postgres")]
    Postgres(Box<postgres::PgTarget>),
}

/// The state's database: the SQLite file and its one connection, or a PostgreSQL connection.
pub enum Store {
    Sqlite {
        conn: Mutex<Connection>,
        path: PathBuf,
        /// Exclusive lock on `data_dir/lock`, released when the store is dropped (or the process
        /// dies). Two control planes on one state file would each keep one-time credentials the
        /// other never sees, and `reclaim_leases` at start is only right when nobody else holds
        /// leases.
        _lock: std::fs::File,
    },
    #[cfg(feature = "store-postgres")]
    Postgres(Box<postgres::PgStore>),
}

impl Store {
    /// Opens the state: for SQLite (creating if needed) `data_dir/control-plane.sqlite3` with mode
    /// 0600, WAL journaling and the current schema; for PostgreSQL a connection and the current
    /// schema (migrations run under a lock, so replicas starting together migrate once).
    ///
    /// # Errors
    /// The directory, file or database cannot be created or reached, the file is not a SQLite
    /// database, or the state was written by a newer schema version.
    pub fn open_backend(backend: &Backend) -> Result<Store, StoreError> {
        match backend {
            Backend::Sqlite(dir) => Store::open(dir),
            #[cfg(feature = "store-postgres")]
            Backend::Postgres(target) => {
                let store = Store::Postgres(Box::new(postgres::PgStore::open((**target).clone())?));
                migrate_pg(&*store.lock()?)?;
                Ok(store)
            }
        }
    }

    /// Opens (creating if needed) `data_dir/control-plane.sqlite3` with mode 0600, WAL journaling
    /// and the current schema.
    ///
    /// # Errors
    /// The directory or file cannot be created, the file is not a SQLite database, or it was
    /// written by a newer schema version.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        create_dir(data_dir)?;
        check_writable(data_dir)?;
        let lock = lock_data_dir(data_dir)?;
        let path = data_dir.join(DB_FILE);
        create_private_file(&path)?;
        let conn = Connection::open(&path).map_err(sql("opening the state database"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("enabling WAL journaling"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql("setting synchronous mode"))?;
        // Every statement goes through the statement cache (see `db`); the store has a few dozen.
        conn.set_prepared_statement_cache_capacity(128);
        // A cached statement stays compiled whatever is bound to it. Without this SQLite marks a
        // statement to be compiled again whenever a parameter it looked at while planning is
        // bound to a new value (the subject lookup's `OR` of two parameters, `LIMIT ?`): the
        // profile of a mass expiry showed 12 % of the daemon's CPU in that recompiling. The store's
        // plans do not depend on values (no `LIKE ?`, no `ANALYZE` statistics).
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(sql("keeping query plans stable"))?;
        migrate(&conn)?;
        Ok(Store::Sqlite {
            conn: Mutex::new(conn),
            path,
            _lock: lock,
        })
    }

    /// Where the state is, for messages: the file's path or `host:port/db`.
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite { path, .. } => path.display().to_string(),
            #[cfg(feature = "store-postgres")]
            Store::Postgres(pg) => format!("postgres {}", pg.target().display()),
        }
    }

    /// Whether this process may run the scheduler and reconcile now. SQLite: always (the data
    /// dir is this process's alone). PostgreSQL: while it holds the leader lock, a session
    /// advisory lock on a connection of its own, taken when free and released by the server when
    /// that session ends (the process died, or its connection broke): another replica takes it
    /// at its next try.
    pub fn try_lead(&self) -> bool {
        match self {
            Store::Sqlite { .. } => true,
            #[cfg(feature = "store-postgres")]
            Store::Postgres(pg) => pg.try_lead(),
        }
    }

    /// Woken when another replica committed jobs that are ready now (PostgreSQL; see
    /// [`Db::announce_ready`]). `None` on SQLite (one process).
    pub fn remote_ready(&self) -> Option<&tokio::sync::Notify> {
        match self {
            Store::Sqlite { .. } => None,
            #[cfg(feature = "store-postgres")]
            Store::Postgres(pg) => Some(pg.remote_ready()),
        }
    }

    /// Whether several processes may share this state (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        !matches!(self, Store::Sqlite { .. })
    }

    /// The connection, held until the guard drops. A poisoned lock (a panic while it was held)
    /// is recovered: the database rolled back whatever transaction was open.
    ///
    /// # Errors
    /// PostgreSQL only: the connection dropped and cannot be made again now (transient).
    pub fn lock(&self) -> Result<StoreGuard<'_>, StoreError> {
        match self {
            Store::Sqlite { conn, .. } => Ok(StoreGuard::Sqlite(
                conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            )),
            #[cfg(feature = "store-postgres")]
            Store::Postgres(pg) => Ok(StoreGuard::Postgres(pg.lock()?)),
        }
    }
}

/// The connection while its lock is held: a [`Db`].
pub enum StoreGuard<'a> {
    Sqlite(MutexGuard<'a, Connection>),
    #[cfg(feature = "store-postgres")]
    Postgres(MutexGuard<'a, Option<postgres::PgConn>>),
}

/// Answers every call with "unavailable" (a PostgreSQL guard whose connection is gone).
#[cfg(feature = "store-postgres")]
struct Closed;

#[cfg(feature = "store-postgres")]
impl Db for Closed {
    fn dialect(&self) -> db::Dialect {
        db::Dialect::Postgres
    }
    fn exec(&self, _: &str, _: &[Val]) -> Result<usize, DbError> {
        Err(DbError::Unavailable("the database connection is closed".into()))
    }
    fn query(&self, _: &str, _: &[Val]) -> Result<Vec<DbRow>, DbError> {
        Err(DbError::Unavailable("the database connection is closed".into()))
    }
    fn batch(&self, _: &str) -> Result<(), DbError> {
        Err(DbError::Unavailable("the database connection is closed".into()))
    }
    fn begin_write(&self) -> Result<(), DbError> {
        Err(DbError::Unavailable("the database connection is closed".into()))
    }
}

impl<'a> std::ops::Deref for StoreGuard<'a> {
    type Target = dyn Db + 'a;
    fn deref(&self) -> &(dyn Db + 'a) {
        match self {
            StoreGuard::Sqlite(c) => &**c,
            #[cfg(feature = "store-postgres")]
            StoreGuard::Postgres(c) => match c.as_ref() {
                Some(c) => c,
                None => &Closed,
            },
        }
    }
}

impl StoreGuard<'_> {
    /// Starts a write transaction that excludes every other writer; it rolls back when dropped
    /// without [`Transaction::commit`].
    ///
    /// # Errors
    /// The database refused or could not be reached.
    pub fn transaction(&self) -> Result<Transaction<'_>, StoreError> {
        let db: &dyn Db = &**self;
        db.begin_write().map_err(sql("starting a transaction"))?;
        Ok(Transaction { db, done: false })
    }

    /// The SQLite connection (tests that write raw rows).
    #[cfg(test)]
    pub fn sqlite(&self) -> Option<&Connection> {
        match self {
            StoreGuard::Sqlite(c) => Some(c),
            #[cfg(feature = "store-postgres")]
            StoreGuard::Postgres(_) => None,
        }
    }
}

/// An open write transaction (a [`Db`]).
pub struct Transaction<'g> {
    db: &'g dyn Db,
    done: bool,
}

impl<'g> std::ops::Deref for Transaction<'g> {
    type Target = dyn Db + 'g;
    fn deref(&self) -> &(dyn Db + 'g) {
        self.db
    }
}

impl Transaction<'_> {
    /// Commits; on failure the transaction is rolled back.
    ///
    /// # Errors
    /// The commit failed (nothing of the transaction was written).
    pub fn commit(mut self) -> Result<(), StoreError> {
        self.done = true;
        if let Err(e) = self.db.batch("COMMIT") {
            let _ = self.db.batch("ROLLBACK");
            return Err(sql("committing")(e));
        }
        Ok(())
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: on a broken connection the server rolls back by itself.
            let _ = self.db.batch("ROLLBACK");
        }
    }
}

/// Columns added after schema v1, as `(table, column, definition)`: added with `ALTER TABLE` to a
/// database written by an older build, so existing state keeps working.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // v2: where an integration came from (`config` or `inline`), so an inline registration cannot
    // replace one the operator declared in the config file.
    ("integrations", "source", "TEXT NOT NULL DEFAULT 'config'"),
    // v2: the integration spec an access was granted with; its revoke goes to the same place even
    // if the named integration changes later (NULL on older rows: the named one is used).
    ("access_requests", "integration_spec", "TEXT"),
    // v2: the grant found equal access already there (made by someone else).
    ("access_requests", "pre_existing", "INTEGER NOT NULL DEFAULT 0"),
    // v3: the binding subject the grant resolved (`BoundSubject` JSON): the overlap key.
    ("access_requests", "bound_subject", "TEXT"),
    // v3: the owner (`connector/install`) the access's bindings were granted under.
    ("access_requests", "owner", "TEXT"),
    // v3: what the requester should know about the grant (no new password, and why).
    ("access_requests", "note", "TEXT"),
    // v4: the subject string and the subject key, kept as plain text so the accesses naming one
    // subject are an index lookup (see `subject_keys_v4`).
    ("access_requests", "subject_name", "TEXT"),
    ("access_requests", "subject_key", "TEXT"),
];

fn has_column(conn: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    let mut stmt = conn
        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .map_err(sql("reading the table layout"))?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(sql("reading the table layout"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql("reading the table layout"))?;
    Ok(names.iter().any(|n| n == column))
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")
        .map_err(sql("creating the schema version table"))?;
    let version: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    match version {
        Some(v) if v > SCHEMA_VERSION => Err(StoreError::Version(format!(
            "the state database has schema version {v}, newer than this build's {SCHEMA_VERSION}: \
             run a newer apono-connector or point data_dir elsewhere"
        ))),
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        from => {
            conn.execute_batch("BEGIN IMMEDIATE")
                .map_err(sql("starting the schema migration"))?;
            let r = migrate_in_transaction(conn, from.unwrap_or(0));
            let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
            conn.execute_batch(end).map_err(sql("ending the schema migration"))?;
            r
        }
    }
}

/// Creates what is missing (a fresh file), or adds the columns of later versions and runs the
/// data steps of each version after `from` (an older file).
fn migrate_in_transaction(conn: &Connection, from: i64) -> Result<(), StoreError> {
    // The tables first without the new index, which needs the new columns on an older file.
    let (tables, indexes): (Vec<&str>, Vec<&str>) = SCHEMA
        .split_inclusive(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .partition(|s| !s.starts_with("CREATE INDEX"));
    conn.execute_batch(&tables.concat())
        .map_err(sql("creating the schema"))?;
    for (table, column, definition) in ADDED_COLUMNS {
        if !has_column(conn, table, column)? {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"))
                .map_err(sql("adding a column to an older state database"))?;
            tracing::info!(table, column, "state database migrated: column added");
        }
    }
    conn.execute_batch(&indexes.concat())
        .map_err(sql("creating the indexes"))?;
    if from < 3 {
        pin_live_accesses(conn)?;
    }
    if from < 4 {
        subject_keys_v4(conn)?;
    }
    if from < 5 {
        migrate_v5(conn)?;
    }
    conn.execute("DELETE FROM schema_version", [])
        .map_err(sql("writing the schema version"))?;
    conn.execute("INSERT INTO schema_version (version) VALUES (?1)", [SCHEMA_VERSION])
        .map_err(sql("writing the schema version"))?;
    Ok(())
}

/// v3 data step (lifecycle review D7): accesses that have not ended, written before accesses were
/// pinned, get their integration's spec as it is in this file (what they were granted with, not
/// what the config says after the upgrade), and so do the open jobs that serve them.
fn pin_live_accesses(conn: &Connection) -> Result<(), StoreError> {
    let accesses = conn
        .execute(
            "UPDATE access_requests
                 SET integration_spec = (SELECT spec FROM integrations WHERE integrations.name = access_requests.integration)
             WHERE integration_spec IS NULL AND state IN ('pending', 'active', 'revoking')",
            [],
        )
        .map_err(sql("pinning the accesses of an older state database"))?;
    let jobs = conn
        .execute(
            "UPDATE jobs
                 SET integration = (SELECT spec FROM integrations WHERE integrations.name = jobs.integration_name)
             WHERE integration IS NULL AND integration_name IS NOT NULL AND state IN ('pending', 'leased')
                 AND access_id IN (SELECT id FROM access_requests WHERE state IN ('pending', 'active', 'revoking'))",
            [],
        )
        .map_err(sql("pinning the open jobs of an older state database"))?;
    if accesses + jobs > 0 {
        tracing::info!(
            accesses,
            jobs,
            "state database migrated: accesses from before the upgrade keep the Rancher they were granted on"
        );
    }
    Ok(())
}

/// v4 indexes, the same on both backends. Accesses are found by subject (`live_access_naming`)
/// on two indexes of their own; the (role, resource) indexes no query uses any more are dropped,
/// and `state` leaves the indexes it does not narrow (an access's subject, a job's access): every
/// index an update touches is one more page written to the journal at each commit, and an
/// access or job changes state several times in its life.
const V4_INDEXES: &str = "
DROP INDEX IF EXISTS access_key;
DROP INDEX IF EXISTS access_binding;
DROP INDEX IF EXISTS jobs_access;
CREATE INDEX IF NOT EXISTS jobs_access ON jobs (access_id, kind);
CREATE INDEX IF NOT EXISTS access_subject_name ON access_requests (subject_name);
CREATE INDEX IF NOT EXISTS access_subject_key ON access_requests (subject_key);
";

/// v4 step, after its columns were added: [`V4_INDEXES`], then the data step: the subject string and key (see [`AccessRow::subject_key`]) of the accesses
/// written before they were columns, so they are found by [`live_access_naming`] as new ones
/// are. Only accesses that have not ended, and legacy `failed` ones (an operator may still revoke
/// them): a `revoked` one is never live again, so never looked up by subject. A row that does
/// not decode is left without them (it is reported where it is read, as before).
fn subject_keys_v4(c: &dyn Db) -> Result<(), StoreError> {
    c.batch(V4_INDEXES).map_err(sql("indexing accesses by subject"))?;
    let rows = access_where(
        c,
        "WHERE subject_name IS NULL AND state IN ('pending', 'active', 'revoking', 'failed')",
        &[],
    )?;
    let mut filled = 0usize;
    for row in rows {
        match row {
            Ok(a) => {
                c.exec(
                    "UPDATE access_requests SET subject_name = ?2, subject_key = ?3 WHERE id = ?1",
                    &p![a.id, a.subject.as_str(), a.subject_key()],
                )
                .map_err(sql("writing the subject keys of an older state database"))?;
                filled += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "state database migration: an access that does not decode keeps no subject key")
            }
        }
    }
    if filled > 0 {
        tracing::info!(
            accesses = filled,
            "state database migrated: live accesses indexed by subject"
        );
    }
    Ok(())
}

/// PostgreSQL schema steps, by the version each one brings the database to. The first is the
/// whole schema as of SQLite's version 3 (PostgreSQL support started there), in PostgreSQL's
/// types; a later version appends a step here and bumps [`SCHEMA_VERSION`] for both backends.
#[cfg(feature = "store-postgres")]
const PG_MIGRATIONS: &[(i64, &str)] = &[
    (
        3,
        "
CREATE TABLE integrations (
    name        TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    source      TEXT NOT NULL DEFAULT 'config'
);
CREATE TABLE jobs (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    kind              TEXT NOT NULL,
    integration_name  TEXT,
    integration       TEXT,
    params            TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempt           BIGINT NOT NULL,
    lease_token       TEXT,
    lease_expires_at  BIGINT,
    not_before        BIGINT,
    completed_token   TEXT,
    result            TEXT,
    error             TEXT,
    access_id         TEXT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX jobs_ready ON jobs (state, not_before, lease_expires_at);
CREATE TABLE access_requests (
    seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                TEXT NOT NULL UNIQUE,
    integration       TEXT NOT NULL,
    subject           TEXT NOT NULL,
    role              TEXT NOT NULL,
    resource          TEXT NOT NULL,
    ttl_seconds       BIGINT NOT NULL,
    create_user       BOOLEAN NOT NULL,
    state             TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    granted_at        BIGINT,
    expires_at        BIGINT,
    revoked_at        BIGINT,
    grant_job_id      TEXT NOT NULL,
    revoke_job_id     TEXT,
    user_id           TEXT,
    binding_ids       TEXT NOT NULL,
    access_details    TEXT,
    last_error        TEXT,
    revoke_requested  BOOLEAN NOT NULL DEFAULT false,
    integration_spec  TEXT,
    pre_existing      BOOLEAN NOT NULL DEFAULT false,
    bound_subject     TEXT,
    owner             TEXT,
    note              TEXT
);
CREATE INDEX access_due ON access_requests (state, expires_at);
CREATE INDEX access_key ON access_requests (integration, role, resource, state);
CREATE INDEX access_binding ON access_requests (role, resource, state);
CREATE INDEX jobs_access ON jobs (access_id, kind, state);
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE managed_users (
    integration       TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    next_rotation_at  BIGINT,
    cleanup_at        BIGINT,
    PRIMARY KEY (integration, user_id)
);
CREATE TABLE resources (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  TEXT NOT NULL,
    object  TEXT NOT NULL
);
CREATE INDEX resources_job ON resources (job_id, seq);
",
    ),
    (
        4,
        "
ALTER TABLE access_requests ADD COLUMN subject_name TEXT;
ALTER TABLE access_requests ADD COLUMN subject_key TEXT;
",
    ),
    (5, ONE_TIME_CREDENTIALS_V5),
    // v6: the queue in hand-out order (`QUEUE_RANK`), for `ready_jobs`.
    (
        6,
        "CREATE INDEX jobs_queue ON jobs (state, (CASE kind WHEN 'revoke' THEN 0 WHEN 'grant' THEN 1 ELSE 2 END), seq)",
    ),
];

/// Brings a PostgreSQL database to [`SCHEMA_VERSION`], one step per version, in one transaction
/// under the write lock (replicas starting together: one migrates, the others find it done).
/// A database written by a newer build is refused, as on SQLite.
#[cfg(feature = "store-postgres")]
fn migrate_pg(c: &dyn Db) -> Result<(), StoreError> {
    c.begin_write().map_err(sql("starting the schema migration"))?;
    let r = migrate_pg_in_transaction(c);
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    c.batch(end).map_err(sql("ending the schema migration"))?;
    r
}

#[cfg(feature = "store-postgres")]
fn migrate_pg_in_transaction(c: &dyn Db) -> Result<(), StoreError> {
    c.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .map_err(sql("creating the schema version table"))?;
    let version: Option<i64> = query_opt(c, "SELECT MAX(version) FROM schema_version", &[])
        .map_err(sql("reading the schema version"))?
        .map(|r| r.get::<Option<i64>>(0))
        .transpose()
        .map_err(|message| StoreError::Corrupt {
            table: "schema_version",
            key: "version".into(),
            message,
        })?
        .flatten();
    let from = version.unwrap_or(0);
    if from > SCHEMA_VERSION {
        return Err(StoreError::Version(format!(
            "the state database has schema version {from}, newer than this build's {SCHEMA_VERSION}: \
             run a newer apono-connector on every replica, or point database_url elsewhere"
        )));
    }
    for (version, step) in PG_MIGRATIONS.iter().filter(|(v, _)| *v > from) {
        c.batch(step).map_err(sql("migrating the state database"))?;
        c.exec("DELETE FROM schema_version", &[])
            .map_err(sql("writing the schema version"))?;
        c.exec("INSERT INTO schema_version (version) VALUES (?1)", &p![*version])
            .map_err(sql("writing the schema version"))?;
        tracing::info!(version, "state database migrated");
    }
    if from < 4 {
        subject_keys_v4(c)?;
    }
    Ok(())
}

/// The id of this control plane's state, made once (uuid v7, simple form) and kept in `meta`:
/// with the connector id it names the owner of every binding the connector makes.
pub fn install_id(c: &dyn Db) -> Result<String, StoreError> {
    let fresh = uuid::Uuid::now_v7().simple().to_string();
    c.exec(
        "INSERT INTO meta (key, value) VALUES ('install_id', ?1) ON CONFLICT (key) DO NOTHING",
        &p![fresh],
    )
    .map_err(sql("writing the install id"))?;
    let row =
        query_opt(c, "SELECT value FROM meta WHERE key = 'install_id'", &[]).map_err(sql("reading the install id"))?;
    row.map(|r| r.get::<String>(0))
        .transpose()
        .map_err(|message| corrupt("meta", "install_id", message))?
        .ok_or_else(|| corrupt("meta", "install_id", "missing after it was written".into()))
}

/// The row's id (first column) for a message about a row that does not decode.
fn key_of(r: &DbRow) -> String {
    r.get::<String>(0).unwrap_or_else(|_| "?".into())
}

/// The one value of a one-row aggregate (`MIN`, `MAX`), as an optional integer.
fn first_value(table: &'static str, rows: Vec<DbRow>) -> Result<Option<i64>, StoreError> {
    match rows.first() {
        Some(r) => r
            .get::<Option<i64>>(0)
            .map_err(|message| corrupt(table, "(aggregate)", message)),
        None => Ok(None),
    }
}

pub(crate) fn corrupt(table: &'static str, key: &str, message: String) -> StoreError {
    StoreError::Corrupt {
        table,
        key: key.to_string(),
        message,
    }
}

/// What `state copy` moved, table by table.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Copied {
    pub integrations: usize,
    pub jobs: usize,
    pub access_requests: usize,
    pub managed_users: usize,
    pub resources: usize,
    /// Leases of the stopped process handed back, so their jobs run at once.
    pub leases_reclaimed: usize,
}

/// Copies a SQLite state (its data dir locked meanwhile: the daemon must be stopped) into an
/// empty PostgreSQL database, in one transaction: integrations, jobs with their leases handed
/// back, access requests (live ones keep their expiry, so their revokes still run), managed
/// users, discovered objects, and `meta` (the install id: the copy is the same owner, so it
/// revokes the bindings the SQLite install made).
///
/// # Errors
/// `Config` when the database already holds state (nothing is written then); `InUse` when a
/// daemon has the data dir; `Db` when either database fails.
#[cfg(feature = "store-postgres")]
pub fn copy_sqlite_to_postgres(from: &Path, to: &postgres::PgTarget) -> Result<Copied, StoreError> {
    if !from.join(DB_FILE).is_file() {
        return Err(StoreError::Config(format!(
            "{} holds no state ({DB_FILE} is missing): give the data_dir of the install to move",
            from.display()
        )));
    }
    let src_store = Store::open(from)?;
    let dst_store = Store::open_backend(&Backend::Postgres(Box::new(to.clone())))?;
    let src_guard = src_store.lock()?;
    let dst_guard = dst_store.lock()?;
    let src: &dyn Db = &*src_guard;
    let tx = dst_guard.transaction()?;
    let held: i64 = tx
        .query(
            "SELECT (SELECT COUNT(*) FROM integrations) + (SELECT COUNT(*) FROM jobs) \
             + (SELECT COUNT(*) FROM access_requests) + (SELECT COUNT(*) FROM managed_users) \
             + (SELECT COUNT(*) FROM meta)",
            &[],
        )
        .map_err(sql("checking that the database is empty"))
        .and_then(|rows| first_value("meta", rows))?
        .unwrap_or(0);
    if held > 0 {
        return Err(StoreError::Config(format!(
            "the database {} already holds control-plane state ({held} rows): copy into an empty database",
            to.display()
        )));
    }
    let copy = |table: &str, columns: &str, order: &str| -> Result<usize, StoreError> {
        let rows = src
            .query(&format!("SELECT {columns} FROM {table} ORDER BY {order}"), &[])
            .map_err(sql("reading the SQLite state"))?;
        let placeholders: Vec<String> = (1..=columns.split(',').count()).map(|i| format!("?{i}")).collect();
        let insert = format!("INSERT INTO {table} ({columns}) VALUES ({})", placeholders.join(", "));
        for row in &rows {
            tx.exec(&insert, &row.0).map_err(sql("writing into the database"))?;
        }
        Ok(rows.len())
    };
    copy("meta", "key, value", "key")?;
    let copied = Copied {
        integrations: copy("integrations", "name, spec, updated_at, source", "name")?,
        jobs: copy("jobs", JOB_COLUMNS, "seq")?,
        access_requests: copy(
            "access_requests",
            &format!("{ACCESS_COLUMNS}, {SUBJECT_COLUMNS}"),
            "seq",
        )?,
        managed_users: copy(
            "managed_users",
            "integration, user_id, next_rotation_at, cleanup_at",
            "integration, user_id",
        )?,
        resources: copy("resources", "job_id, object", "seq")?,
        // The process that held them is stopped (its data dir is locked by us now).
        leases_reclaimed: reclaim_leases(&*tx, Utc::now())?,
    };
    tx.commit()?;
    Ok(copied)
}

// ----- time and JSON helpers -----

pub fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(table: &'static str, key: &str, ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StoreError::Corrupt {
        table,
        key: key.to_string(),
        message: format!("timestamp {ms} out of range"),
    })
}

fn opt_ms(table: &'static str, key: &str, ms: Option<i64>) -> Result<Option<DateTime<Utc>>, StoreError> {
    ms.map(|ms| from_ms(table, key, ms)).transpose()
}

fn json_text<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt {
        table: "(write)",
        key: String::new(),
        message: format!("value does not serialize: {e}"),
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(
    table: &'static str,
    key: &str,
    column: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        table,
        key: key.to_string(),
        message: format!("column {column}: {e}"),
    })
}

fn opt_json<T: serde::de::DeserializeOwned>(
    table: &'static str,
    key: &str,
    column: &str,
    text: Option<String>,
) -> Result<Option<T>, StoreError> {
    text.map(|t| parse_json(table, key, column, &t)).transpose()
}

fn job_state_str(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "pending",
        JobState::Leased => "leased",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
    }
}

fn job_state_parse(s: &str) -> Option<JobState> {
    Some(match s {
        "pending" => JobState::Pending,
        "leased" => JobState::Leased,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed,
        _ => return None,
    })
}

fn access_state_parse(s: &str) -> Option<AccessState> {
    Some(match s {
        "pending" => AccessState::Pending,
        "active" => AccessState::Active,
        "revoking" => AccessState::Revoking,
        "revoked" => AccessState::Revoked,
        "failed" => AccessState::Failed,
        _ => return None,
    })
}

// ----- integrations -----

/// Where a registered integration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrationSource {
    /// Declared in the config file (registered at start; may change anything).
    Config,
    /// Given inline as JSON in an access request.
    Inline,
}

impl IntegrationSource {
    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationSource::Config => "config",
            IntegrationSource::Inline => "inline",
        }
    }
}

pub fn upsert_integration(
    c: &dyn Db,
    name: &str,
    spec: &Value,
    source: IntegrationSource,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    c.exec(
        "INSERT INTO integrations (name, spec, updated_at, source) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at,
             source = excluded.source",
        &p![name, json_text(spec)?, to_ms(now), source.as_str()],
    )
    .map_err(sql("saving an integration"))?;
    Ok(())
}

/// The registered spec and where it came from.
pub fn integration_with_source(c: &dyn Db, name: &str) -> Result<Option<(Value, IntegrationSource)>, StoreError> {
    let row = query_opt(c, "SELECT spec, source FROM integrations WHERE name = ?1", &p![name])
        .map_err(sql("reading an integration"))?;
    let Some(row) = row else { return Ok(None) };
    let (text, source): (String, String) =
        (|| Ok((row.get(0)?, row.get(1)?)))().map_err(|message| corrupt("integrations", name, message))?;
    let spec = parse_json("integrations", name, "spec", &text)?;
    let source = if source == "inline" {
        IntegrationSource::Inline
    } else {
        IntegrationSource::Config
    };
    Ok(Some((spec, source)))
}

/// The registered spec, as JSON (including inline credentials, to hand to the agent).
pub fn integration(c: &dyn Db, name: &str) -> Result<Option<Value>, StoreError> {
    let text: Option<String> = query_opt(c, "SELECT spec FROM integrations WHERE name = ?1", &p![name])
        .map_err(sql("reading an integration"))?
        .map(|r| r.get(0))
        .transpose()
        .map_err(|message| corrupt("integrations", name, message))?;
    opt_json("integrations", name, "spec", text)
}

pub fn integration_names(c: &dyn Db) -> Result<Vec<String>, StoreError> {
    c.query("SELECT name FROM integrations ORDER BY name", &[])
        .map_err(sql("listing integrations"))?
        .iter()
        .map(|r| r.get(0).map_err(|message| corrupt("integrations", "?", message)))
        .collect()
}

// ----- jobs -----

/// A job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub kind: String,
    /// Set when the job names a registered integration: the spec is read at lease time.
    pub integration_name: Option<String>,
    /// An inline integration, stored as given (the agent validates it).
    pub integration: Option<Value>,
    pub params: Value,
    pub state: JobState,
    /// Number of times the job was handed out.
    pub attempt: u32,
    pub lease_token: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// A requeued job is not handed out before this time (backoff).
    pub not_before: Option<DateTime<Utc>>,
    /// Token of the last `complete` taken: a repeat with it is acknowledged and ignored.
    pub completed_token: Option<String>,
    /// The result, with any `credentials` removed.
    pub result: Option<Value>,
    pub error: Option<JobError>,
    /// The access request this job serves (grant, revoke, rotation), if any.
    pub access_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const JOB_COLUMNS: &str = "id, kind, integration_name, integration, params, state, attempt, lease_token, \
     lease_expires_at, not_before, completed_token, result, error, access_id, created_at, updated_at";

struct RawJob {
    id: String,
    kind: String,
    integration_name: Option<String>,
    integration: Option<String>,
    params: String,
    state: String,
    attempt: i64,
    lease_token: Option<String>,
    lease_expires_at: Option<i64>,
    not_before: Option<i64>,
    completed_token: Option<String>,
    result: Option<String>,
    error: Option<String>,
    access_id: Option<String>,
    created_at: i64,
    updated_at: i64,
}

/// Moves the columns out of `r` (no copy of their text).
fn raw_job(r: &mut DbRow) -> Result<RawJob, String> {
    Ok(RawJob {
        kind: r.take(1)?,
        integration_name: r.take(2)?,
        integration: r.take(3)?,
        params: r.take(4)?,
        state: r.take(5)?,
        attempt: r.take(6)?,
        lease_token: r.take(7)?,
        lease_expires_at: r.take(8)?,
        not_before: r.take(9)?,
        completed_token: r.take(10)?,
        result: r.take(11)?,
        error: r.take(12)?,
        access_id: r.take(13)?,
        created_at: r.take(14)?,
        updated_at: r.take(15)?,
        // Last: a column that does not decode leaves the id for the error's key.
        id: r.take(0)?,
    })
}

impl RawJob {
    fn decode(self) -> Result<JobRow, StoreError> {
        const T: &str = "jobs";
        let id = self.id;
        let corrupt = |message: String| StoreError::Corrupt {
            table: T,
            key: id.clone(),
            message,
        };
        let state = job_state_parse(&self.state).ok_or_else(|| corrupt(format!("unknown state {:?}", self.state)))?;
        let attempt =
            u32::try_from(self.attempt).map_err(|_| corrupt(format!("attempt {} out of range", self.attempt)))?;
        Ok(JobRow {
            kind: self.kind,
            integration_name: self.integration_name,
            integration: opt_json(T, &id, "integration", self.integration)?,
            params: parse_json(T, &id, "params", &self.params)?,
            state,
            attempt,
            lease_token: self.lease_token,
            lease_expires_at: opt_ms(T, &id, self.lease_expires_at)?,
            not_before: opt_ms(T, &id, self.not_before)?,
            completed_token: self.completed_token,
            result: opt_json(T, &id, "result", self.result)?,
            error: opt_json(T, &id, "error", self.error)?,
            access_id: self.access_id,
            created_at: from_ms(T, &id, self.created_at)?,
            updated_at: from_ms(T, &id, self.updated_at)?,
            id,
        })
    }
}

pub fn insert_job(c: &dyn Db, j: &JobRow) -> Result<(), StoreError> {
    c.exec_quiet(
        &format!("INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"),
        &p![
            j.id,
            j.kind,
            j.integration_name,
            j.integration.as_ref().map(json_text).transpose()?,
            json_text(&j.params)?,
            job_state_str(j.state),
            i64::from(j.attempt),
            j.lease_token,
            j.lease_expires_at.map(to_ms),
            j.not_before.map(to_ms),
            j.completed_token,
            j.result.as_ref().map(json_text).transpose()?,
            j.error.as_ref().map(json_text).transpose()?,
            j.access_id,
            to_ms(j.created_at),
            to_ms(j.updated_at),
        ],
    )
    .map_err(sql("inserting a job"))?;
    Ok(())
}

/// Writes the mutable columns of a job.
pub fn update_job(c: &dyn Db, j: &JobRow) -> Result<(), StoreError> {
    c.exec_quiet(
        "UPDATE jobs SET state = ?2, attempt = ?3, lease_token = ?4, lease_expires_at = ?5, not_before = ?6,
             completed_token = ?7, result = ?8, error = ?9, updated_at = ?10, params = ?11
         WHERE id = ?1",
        &p![
            j.id,
            job_state_str(j.state),
            i64::from(j.attempt),
            j.lease_token,
            j.lease_expires_at.map(to_ms),
            j.not_before.map(to_ms),
            j.completed_token,
            j.result.as_ref().map(json_text).transpose()?,
            j.error.as_ref().map(json_text).transpose()?,
            to_ms(j.updated_at),
            json_text(&j.params)?,
        ],
    )
    .map_err(sql("updating a job"))?;
    Ok(())
}

pub fn job(c: &dyn Db, id: &str) -> Result<Option<JobRow>, StoreError> {
    let raw = query_opt(c, &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), &p![id])
        .map_err(sql("reading a job"))?
        .map(|mut r| raw_job(&mut r))
        .transpose()
        .map_err(|message| corrupt("jobs", id, message))?;
    raw.map(RawJob::decode).transpose()
}

/// A job and the access request it serves, in one query: a completion reads both under the write
/// lock, and on PostgreSQL that is one round trip instead of two. The access is `None` when the
/// job serves none or its row is gone, `Some(Err)` when its row does not decode (the job's
/// outcome is recorded anyway).
#[allow(clippy::type_complexity)]
pub fn job_with_access(
    c: &dyn Db,
    id: &str,
) -> Result<Option<(JobRow, Option<Result<AccessRow, StoreError>>)>, StoreError> {
    static STATEMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let statement = STATEMENT.get_or_init(|| {
        let qualified = |alias: &str, columns: &str| {
            columns
                .split(',')
                .map(|column| format!("{alias}.{}", column.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "SELECT {}, {} FROM jobs j LEFT JOIN access_requests a ON a.id = j.access_id WHERE j.id = ?1",
            qualified("j", JOB_COLUMNS),
            qualified("a", ACCESS_COLUMNS)
        )
    });
    let Some(DbRow(mut values)) =
        query_opt(c, statement, &p![id]).map_err(sql("reading a job and its access request"))?
    else {
        return Ok(None);
    };
    let access_values = values.split_off(JOB_COLUMNS.split(',').count().min(values.len()));
    let job = raw_job(&mut DbRow(values))
        .map_err(|message| corrupt("jobs", id, message))?
        .decode()?;
    let access = match &job.access_id {
        // No row joined: its id (the first column) is NULL.
        Some(access_id) if !matches!(access_values.first(), None | Some(Val::Null)) => Some(
            raw_access(&mut DbRow(access_values))
                .map_err(|message| corrupt("access_requests", access_id, message))
                .and_then(RawAccess::decode),
        ),
        _ => None,
    };
    Ok(Some((job, access)))
}

/// Rows matching `where_sql`, oldest first. Rows that do not decode are returned as errors in
/// place, so one corrupt row cannot hide the others.
fn jobs_where(c: &dyn Db, where_sql: &str, args: &[Val]) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    let rows = c
        .query(&format!("SELECT {JOB_COLUMNS} FROM jobs {where_sql}"), args)
        .map_err(sql("querying jobs"))?
        .into_iter()
        .map(decode_job)
        .collect();
    Ok(rows)
}

fn decode_job(mut r: DbRow) -> Result<JobRow, StoreError> {
    match raw_job(&mut r) {
        Ok(raw) => raw.decode(),
        Err(message) => Err(corrupt("jobs", &key_of(&r), message)),
    }
}

pub fn list_jobs(c: &dyn Db) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    jobs_where(c, "ORDER BY seq", &[])
}

/// The order jobs are handed out in: revokes first (access ends on time however long the queue),
/// then grants, then the rest (discovery, sweeps, rotations). The `jobs_queue` index (v6) is on
/// this very expression, so a lease walks the queue in order and stops at its limit.
const QUEUE_RANK: &str = "CASE kind WHEN 'revoke' THEN 0 WHEN 'grant' THEN 1 ELSE 2 END";

/// The jobs ready at `?1`: pending and past their backoff (a new job has none), or leased with an
/// expired lease. Two conditions, each an ordered walk of `jobs_queue`.
const READY_AT_1: [&str; 2] = [
    "state = 'pending' AND (not_before IS NULL OR not_before <= ?1)",
    "state = 'leased' AND lease_expires_at <= ?1",
];

/// Whether any job is ready at `now` ([`READY_AT_1`]), without reading or locking it.
pub fn any_ready_job(c: &dyn Db, now: DateTime<Utc>) -> Result<bool, StoreError> {
    let [pending, leased] = READY_AT_1;
    let rows = c
        .query(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE {pending}) OR EXISTS (SELECT 1 FROM jobs WHERE {leased})"
            ),
            &p![to_ms(now)],
        )
        .map_err(sql("looking for ready jobs"))?;
    // SQLite answers an integer, PostgreSQL a boolean: `bool` reads both.
    rows.first()
        .map_or(Ok(false), |r| r.get::<bool>(0))
        .map_err(|message| corrupt("jobs", "(ready)", message))
}

/// Jobs that may be handed out at `now`: pending and past their backoff, or leased with an
/// expired lease. Revokes first, then grants, then the rest ([`QUEUE_RANK`]); oldest first within
/// each; at most `limit`.
///
/// Two queries, each an ordered walk of `jobs_queue` that stops after `limit` rows, merged here:
/// one query with `OR` over both states had to read and sort every pending job for each lease
/// (a lease of one job behind 1,000 queued grants: about 250 µs, at every freed worker slot).
pub fn ready_jobs(c: &dyn Db, now: DateTime<Utc>, limit: u32) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    let args = p![to_ms(now), i64::from(limit)];
    // PostgreSQL: rows another replica's transaction holds are skipped, never handed out twice
    // (writers also serialise on the write lock; this keeps the rule in the query itself). Rows
    // the merge leaves out stay locked until this transaction ends: handed out by the next lease.
    let lock = match c.dialect() {
        db::Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
        db::Dialect::Sqlite => "",
    };
    let mut rows = Vec::new();
    for state in READY_AT_1 {
        let found = c
            .query(
                &format!(
                    "SELECT {JOB_COLUMNS}, {QUEUE_RANK}, seq FROM jobs WHERE {state}
                     ORDER BY {QUEUE_RANK}, seq LIMIT ?2{lock}"
                ),
                &args,
            )
            .map_err(sql("querying ready jobs"))?;
        rows.extend(found);
    }
    let position = |r: &DbRow| {
        let n = JOB_COLUMNS.split(',').count();
        (
            r.get::<i64>(n).unwrap_or(i64::MAX),
            r.get::<i64>(n + 1).unwrap_or(i64::MAX),
        )
    };
    rows.sort_by_cached_key(position);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(rows.into_iter().map(decode_job).collect())
}

/// Sweep jobs not yet settled (pending or leased).
pub fn open_sweeps(c: &dyn Db) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    jobs_where(
        c,
        "WHERE kind = 'sweep' AND state IN ('pending', 'leased') ORDER BY seq",
        &[],
    )
}

/// Jobs of one kind serving access `access_id` that have not settled (pending or leased).
pub fn open_jobs_of_access(
    c: &dyn Db,
    access_id: &str,
    kind: &str,
) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    jobs_where(
        c,
        "WHERE access_id = ?1 AND kind = ?2 AND state IN ('pending', 'leased') ORDER BY seq",
        &p![access_id, kind],
    )
}

/// Every leased job becomes pending at once (lease cleared, attempt kept). Returns how many.
pub fn reclaim_leases(c: &dyn Db, now: DateTime<Utc>) -> Result<usize, StoreError> {
    c.exec(
        "UPDATE jobs SET state = 'pending', lease_token = NULL, lease_expires_at = NULL, not_before = NULL,
             updated_at = ?1
         WHERE state = 'leased'",
        &p![to_ms(now)],
    )
    .map_err(sql("handing back the leases of a dead process"))
}

/// Marks a job whose row does not decode as failed for good, touching only columns that cannot
/// be corrupt, so it stops being looked at.
pub fn fail_corrupt_job(c: &dyn Db, id: &str, message: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
    let error = JobError {
        code: "corrupt_job".into(),
        message: message.to_string(),
        retryable: false,
    };
    c.exec(
        "UPDATE jobs SET state = 'failed', lease_token = NULL, lease_expires_at = NULL, not_before = NULL,
             error = ?2, updated_at = ?3
         WHERE id = ?1",
        &p![id, json_text(&error)?, to_ms(now)],
    )
    .map_err(sql("marking a corrupt job failed"))?;
    Ok(())
}

/// The earliest time a job not ready now becomes ready (a backoff ending, a lease running out).
pub fn next_ready_at(c: &dyn Db) -> Result<Option<DateTime<Utc>>, StoreError> {
    let ms: Option<i64> = c
        .query(
            "SELECT MIN(t) FROM (
                 SELECT not_before AS t FROM jobs WHERE state = 'pending' AND not_before IS NOT NULL
                 UNION ALL
                 SELECT lease_expires_at AS t FROM jobs WHERE state = 'leased' AND lease_expires_at IS NOT NULL) AS due",
            &[],
        )
        .map_err(sql("reading the next job time"))
        .and_then(|rows| first_value("jobs", rows))?;
    opt_ms("jobs", "(next ready)", ms)
}

// ----- access requests -----

/// An access request as stored (the operator view without one-time credentials).
#[derive(Debug, Clone)]
pub struct AccessRow {
    pub id: String,
    pub integration: String,
    pub subject: Subject,
    pub role: String,
    pub resource: Resource,
    pub ttl_seconds: u64,
    pub create_user: bool,
    pub state: AccessState,
    pub created_at: DateTime<Utc>,
    pub granted_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub grant_job_id: String,
    pub revoke_job_id: Option<String>,
    pub user_id: Option<String>,
    pub binding_ids: Vec<String>,
    pub access_details: Option<String>,
    pub last_error: Option<JobError>,
    /// `revoke` was asked while the grant was running: revoke as soon as it settles.
    pub revoke_requested: bool,
    /// The integration spec the access was created with; its jobs go there whatever the named
    /// integration says later. `None` on rows written before schema v2 (the named one is used).
    pub integration_spec: Option<Value>,
    /// The grant found equal access already there, made by someone else.
    pub pre_existing: bool,
    /// The binding subject the grant resolved (`None` before it completed, and on older rows).
    pub bound_subject: Option<BoundSubject>,
    /// The owner the access's grant ran under (`None` before its first hand-out, and on older
    /// rows): its revoke and repairs act for this owner.
    pub owner: Option<Owner>,
    /// For the requester: why the grant returned no credentials.
    pub note: Option<String>,
}

impl AccessRow {
    /// The Rancher object the access's binding is bound by, as `field=value`: the one its grant
    /// recorded, or one derived from the subject where the subject alone says it (`local://u-x`
    /// is `userId=u-x`, a group is its principal, an external user's principal binds by
    /// `userPrincipalId` at cluster and project scope, a username whose Rancher user id was
    /// recorded binds by that id). `None` until known. Kept in the `subject_key` column, so the
    /// accesses sharing a key are an index lookup.
    pub fn subject_key(&self) -> Option<String> {
        if let Some(bound) = &self.bound_subject {
            return Some(bound.key());
        }
        let key = |field: &str, value: &str| {
            BoundSubject {
                field: field.to_string(),
                value: value.to_string(),
            }
            .key()
        };
        match &self.subject {
            Subject::GroupPrincipal(g) => Some(key("groupPrincipalId", g)),
            Subject::UserPrincipal(p) => match p.strip_prefix("local://") {
                Some(id) => Some(key("userId", id)),
                None if self.resource.scope() != BindingScope::Global => Some(key("userPrincipalId", p)),
                None => None,
            },
            Subject::Username(_) => self.rancher_user_id().map(|u| key("userId", &u)),
        }
    }

    /// The recorded user id, if it is a Rancher user id (`u-abc12`): what a revoke may name a
    /// user by. A group's or an external user's principal id is not one (lifecycle review D1).
    pub fn rancher_user_id(&self) -> Option<String> {
        self.user_id.clone().filter(|u| is_user_id(u))
    }
}

/// A Rancher user id (`u-abc12`, `user-x9z`): what a revoke may name a user by. A group's or an
/// external user's principal id is not one (lifecycle review D1: a revoke carrying one was refused
/// as malformed, forever).
pub fn is_user_id(value: &str) -> bool {
    ids::check_plain("user_id", value).is_ok()
}

const ACCESS_COLUMNS: &str = "id, integration, subject, role, resource, ttl_seconds, create_user, state, created_at, \
     granted_at, expires_at, revoked_at, grant_job_id, revoke_job_id, user_id, binding_ids, access_details, \
     last_error, revoke_requested, integration_spec, pre_existing, bound_subject, owner, note";

/// Derived from the row (schema v4), written with it, never read back: what
/// [`live_access_naming`] looks up.
const SUBJECT_COLUMNS: &str = "subject_name, subject_key";

struct RawAccess {
    id: String,
    integration: String,
    subject: String,
    role: String,
    resource: String,
    ttl_seconds: i64,
    create_user: bool,
    state: String,
    created_at: i64,
    granted_at: Option<i64>,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
    grant_job_id: String,
    revoke_job_id: Option<String>,
    user_id: Option<String>,
    binding_ids: String,
    access_details: Option<String>,
    last_error: Option<String>,
    revoke_requested: bool,
    integration_spec: Option<String>,
    pre_existing: bool,
    bound_subject: Option<String>,
    owner: Option<String>,
    note: Option<String>,
}

/// Moves the columns out of `r` (no copy of their text).
fn raw_access(r: &mut DbRow) -> Result<RawAccess, String> {
    Ok(RawAccess {
        integration: r.take(1)?,
        subject: r.take(2)?,
        role: r.take(3)?,
        resource: r.take(4)?,
        ttl_seconds: r.take(5)?,
        create_user: r.take(6)?,
        state: r.take(7)?,
        created_at: r.take(8)?,
        granted_at: r.take(9)?,
        expires_at: r.take(10)?,
        revoked_at: r.take(11)?,
        grant_job_id: r.take(12)?,
        revoke_job_id: r.take(13)?,
        user_id: r.take(14)?,
        binding_ids: r.take(15)?,
        access_details: r.take(16)?,
        last_error: r.take(17)?,
        revoke_requested: r.take(18)?,
        integration_spec: r.take(19)?,
        pre_existing: r.take(20)?,
        bound_subject: r.take(21)?,
        owner: r.take(22)?,
        note: r.take(23)?,
        // Last: a column that does not decode leaves the id for the error's key.
        id: r.take(0)?,
    })
}

impl RawAccess {
    fn decode(self) -> Result<AccessRow, StoreError> {
        const T: &str = "access_requests";
        let id = self.id;
        let corrupt = |message: String| StoreError::Corrupt {
            table: T,
            key: id.clone(),
            message,
        };
        let state =
            access_state_parse(&self.state).ok_or_else(|| corrupt(format!("unknown state {:?}", self.state)))?;
        let resource = Resource::parse(&self.resource).map_err(|e| corrupt(format!("column resource: {e}")))?;
        let ttl_seconds = u64::try_from(self.ttl_seconds)
            .map_err(|_| corrupt(format!("ttl_seconds {} out of range", self.ttl_seconds)))?;
        let owner = self
            .owner
            .as_deref()
            .map(Owner::parse)
            .transpose()
            .map_err(|e| corrupt(format!("column owner: {e}")))?;
        Ok(AccessRow {
            integration: self.integration,
            subject: parse_json(T, &id, "subject", &self.subject)?,
            role: self.role,
            resource,
            ttl_seconds,
            create_user: self.create_user,
            state,
            created_at: from_ms(T, &id, self.created_at)?,
            granted_at: opt_ms(T, &id, self.granted_at)?,
            expires_at: opt_ms(T, &id, self.expires_at)?,
            revoked_at: opt_ms(T, &id, self.revoked_at)?,
            grant_job_id: self.grant_job_id,
            revoke_job_id: self.revoke_job_id,
            user_id: self.user_id,
            binding_ids: parse_json(T, &id, "binding_ids", &self.binding_ids)?,
            access_details: self.access_details,
            last_error: opt_json(T, &id, "last_error", self.last_error)?,
            revoke_requested: self.revoke_requested,
            integration_spec: opt_json(T, &id, "integration_spec", self.integration_spec)?,
            pre_existing: self.pre_existing,
            bound_subject: opt_json(T, &id, "bound_subject", self.bound_subject)?,
            owner,
            note: self.note,
            id,
        })
    }
}

pub fn insert_access(c: &dyn Db, a: &AccessRow) -> Result<(), StoreError> {
    let mut params = access_values(a)?;
    params.extend(p![a.subject.as_str(), a.subject_key()]);
    c.exec_quiet(
        &format!(
            "INSERT INTO access_requests ({ACCESS_COLUMNS}, {SUBJECT_COLUMNS}) VALUES
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,
              ?22, ?23, ?24, ?25, ?26)"
        ),
        &params,
    )
    .map_err(sql("inserting an access request"))?;
    Ok(())
}

/// The values of [`ACCESS_COLUMNS`] for `a`, in order.
fn access_values(a: &AccessRow) -> Result<Vec<Val>, StoreError> {
    Ok(p![
        a.id,
        a.integration,
        json_text(&a.subject)?,
        a.role,
        a.resource.as_str(),
        i64::try_from(a.ttl_seconds).unwrap_or(i64::MAX),
        a.create_user,
        a.state.as_str(),
        to_ms(a.created_at),
        a.granted_at.map(to_ms),
        a.expires_at.map(to_ms),
        a.revoked_at.map(to_ms),
        a.grant_job_id,
        a.revoke_job_id,
        a.user_id,
        json_text(&a.binding_ids)?,
        a.access_details,
        a.last_error.as_ref().map(json_text).transpose()?,
        a.revoke_requested,
        a.integration_spec.as_ref().map(json_text).transpose()?,
        a.pre_existing,
        a.bound_subject.as_ref().map(json_text).transpose()?,
        a.owner.as_ref().map(Owner::as_str),
        a.note,
    ]
    .to_vec())
}

/// Writes the mutable columns of an access request.
pub fn update_access(c: &dyn Db, a: &AccessRow) -> Result<(), StoreError> {
    const SET: &str = "UPDATE access_requests SET state = ?2, granted_at = ?3, expires_at = ?4, revoked_at = ?5,
             revoke_job_id = ?6, user_id = ?7, binding_ids = ?8, access_details = ?9, last_error = ?10,
             revoke_requested = ?11, pre_existing = ?12, bound_subject = ?13, owner = ?14, note = ?15";
    let mut params = p![
        a.id,
        a.state.as_str(),
        a.granted_at.map(to_ms),
        a.expires_at.map(to_ms),
        a.revoked_at.map(to_ms),
        a.revoke_job_id,
        a.user_id,
        json_text(&a.binding_ids)?,
        a.access_details,
        a.last_error.as_ref().map(json_text).transpose()?,
        a.revoke_requested,
        a.pre_existing,
        a.bound_subject.as_ref().map(json_text).transpose()?,
        a.owner.as_ref().map(Owner::as_str),
        a.note,
    ]
    .to_vec();
    let key = a.subject_key();
    match c.dialect() {
        // Every UPDATE is a new row version here, a second one in the same transaction too; an
        // index whose value did not change is left alone anyway (a heap-only update).
        db::Dialect::Postgres => {
            params.extend(p![key]);
            c.exec_quiet(&format!("{SET}, subject_key = ?16 WHERE id = ?1"), &params)
                .map_err(sql("updating an access request"))
        }
        // The key is learnt once (when the grant records the user); written only when it changed,
        // since setting an indexed column, even to the value it has, rewrites its index entry.
        db::Dialect::Sqlite => {
            c.exec_quiet(&format!("{SET} WHERE id = ?1"), &params)
                .map_err(sql("updating an access request"))?;
            match key {
                Some(key) => c.exec_quiet(
                    "UPDATE access_requests SET subject_key = ?2 WHERE id = ?1 AND (subject_key IS NULL OR subject_key <> ?2)",
                    &p![a.id, key],
                ),
                None => c.exec_quiet(
                    "UPDATE access_requests SET subject_key = NULL WHERE id = ?1 AND subject_key IS NOT NULL",
                    &p![a.id],
                ),
            }
            .map_err(sql("updating an access request's subject key"))
        }
    }
}

pub fn access(c: &dyn Db, id: &str) -> Result<Option<AccessRow>, StoreError> {
    let raw = query_opt(
        c,
        &format!("SELECT {ACCESS_COLUMNS} FROM access_requests WHERE id = ?1"),
        &p![id],
    )
    .map_err(sql("reading an access request"))?
    .map(|mut r| raw_access(&mut r))
    .transpose()
    .map_err(|message| corrupt("access_requests", id, message))?;
    raw.map(RawAccess::decode).transpose()
}

fn access_where(c: &dyn Db, where_sql: &str, args: &[Val]) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_rows(c, ACCESS_COLUMNS, where_sql, args)
}

/// `columns`: [`ACCESS_COLUMNS`], or the same list with a column read as `NULL`.
fn access_rows(
    c: &dyn Db,
    columns: &str,
    where_sql: &str,
    args: &[Val],
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    let rows = c
        .query(
            &format!("SELECT {columns} FROM access_requests {where_sql} ORDER BY seq"),
            args,
        )
        .map_err(sql("querying access requests"))?
        .into_iter()
        .map(|mut r| match raw_access(&mut r) {
            Ok(raw) => raw.decode(),
            Err(message) => Err(corrupt("access_requests", &key_of(&r), message)),
        })
        .collect();
    Ok(rows)
}

/// Every access request, oldest first, for the operator's list: without the pinned integration
/// spec (`integration_spec` is `None`). The list does not show it, it is the largest column to
/// decode (a CA certificate, a secret store), read for every access at every listing, and it may
/// hold an inline integration's credentials.
pub fn list_access(c: &dyn Db) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    static COLUMNS: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| ACCESS_COLUMNS.replace("integration_spec", "NULL"));
    access_rows(c, &COLUMNS, "", &[])
}

/// What a prune removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub jobs: usize,
    pub resources: usize,
    pub access_requests: usize,
}

/// Forgets finished work last touched before `cutoff`: discovered objects of finished jobs,
/// finished jobs, and access requests that ended (revoked or failed) with their jobs. Nothing
/// pending, leased, active or revoking is touched, whatever its age.
pub fn prune(c: &dyn Db, cutoff: DateTime<Utc>) -> Result<Pruned, StoreError> {
    let cutoff = to_ms(cutoff);
    let ended_access = "SELECT id FROM access_requests WHERE state IN ('revoked', 'failed') \
                        AND COALESCE(revoked_at, created_at) < ?1";
    let old_job = format!(
        "state IN ('succeeded', 'failed') AND updated_at < ?1 \
         AND (access_id IS NULL OR access_id IN ({ended_access}))"
    );
    let resources = c
        .exec(
            &format!("DELETE FROM resources WHERE job_id IN (SELECT id FROM jobs WHERE {old_job})"),
            &p![cutoff],
        )
        .map_err(sql("pruning discovered objects"))?;
    let jobs = c
        .exec(&format!("DELETE FROM jobs WHERE {old_job}"), &p![cutoff])
        .map_err(sql("pruning finished jobs"))?;
    let access_requests = c
        .exec(
            &format!(
                "DELETE FROM access_requests WHERE id IN ({ended_access}) \
                 AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.access_id = access_requests.id)"
            ),
            &p![cutoff],
        )
        .map_err(sql("pruning ended access requests"))?;
    Ok(Pruned {
        jobs,
        resources,
        access_requests,
    })
}

/// The earliest expiry of an active access (the `access_due` index: no scan).
pub fn next_expiry(c: &dyn Db) -> Result<Option<DateTime<Utc>>, StoreError> {
    let ms: Option<i64> = c
        .query(
            "SELECT MIN(expires_at) FROM access_requests WHERE state = 'active' AND expires_at IS NOT NULL",
            &[],
        )
        .map_err(sql("reading the next expiry"))
        .and_then(|rows| first_value("access_requests", rows))?;
    opt_ms("access_requests", "(next expiry)", ms)
}

/// Active accesses whose TTL has ended.
pub fn expired_access(c: &dyn Db, now: DateTime<Utc>) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(c, "WHERE state = 'active' AND expires_at <= ?1", &p![to_ms(now)])
}

/// Accesses of one Rancher user (by the user id the grant reported) on one integration.
pub fn access_of_user(
    c: &dyn Db,
    integration: &str,
    user_id: &str,
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(c, "WHERE integration = ?1 AND user_id = ?2", &p![integration, user_id])
}

/// Accesses that have not ended (pending, active or revoking), oldest first.
pub fn live_access(c: &dyn Db) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(c, "WHERE state IN ('pending', 'active', 'revoking')", &[])
}

/// Accesses other than `a` that have not ended (on one (role, resource), when given) and name
/// `a`'s subject: the same subject string, or the same subject key ([`AccessRow::subject_key`]).
/// An exact match on the indexed `subject_name` and `subject_key` columns, so a mass expiry on one
/// role does not read every live access for each one that ends; the caller still decides with the
/// full rule (same Rancher, same kind of subject). `a` itself is left out in the query: in the
/// usual case (one access per subject) nothing is read back at all.
pub fn live_access_naming(
    c: &dyn Db,
    on: Option<(&str, &Resource)>,
    a: &AccessRow,
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    // A NULL key (not known yet) matches nothing: `NULL = NULL` is not true. The role and
    // resource are compared here, not in SQL: given to it, SQLite's planner prefers the
    // (role, resource) index, which is the scan of every access on the role this avoids.
    let rows = access_where(
        c,
        "WHERE (subject_name = ?1 OR subject_key = ?2) AND state IN ('pending', 'active', 'revoking') AND id <> ?3",
        &p![a.subject.as_str(), a.subject_key(), a.id],
    )?;
    Ok(match on {
        None => rows,
        Some((role, resource)) => rows
            .into_iter()
            .filter(|r| r.as_ref().map_or(true, |o| o.role == role && &o.resource == resource))
            .collect(),
    })
}

/// How many accesses [`live_access_naming_any`] looks up per statement: a fixed number of
/// parameters (unused ones `NULL`, which matches nothing), so one prepared statement serves every
/// call.
pub const NAMING_BATCH: usize = 100;

/// The accesses that have not ended and name the subject of any of `of` (by name or by key, as
/// [`live_access_naming`] asks for one), `of` themselves included, in one query per
/// [`NAMING_BATCH`]: a mass expiry reads its chunk back once instead of twice per access.
pub fn live_access_naming_any(c: &dyn Db, of: &[AccessRow]) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    static WHERE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let where_sql = WHERE.get_or_init(|| {
        let list = |from: usize| {
            (from..from + NAMING_BATCH)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "WHERE (subject_name IN ({}) OR subject_key IN ({})) AND state IN ('pending', 'active', 'revoking')",
            list(1),
            list(1 + NAMING_BATCH)
        )
    });
    let mut out = Vec::new();
    for batch in of.chunks(NAMING_BATCH) {
        let mut args = vec![Val::Null; 2 * NAMING_BATCH];
        for (i, a) in batch.iter().enumerate() {
            args[i] = Val::Text(a.subject.as_str().to_string());
            if let Some(key) = a.subject_key() {
                args[NAMING_BATCH + i] = Val::Text(key);
            }
        }
        out.extend(access_where(c, where_sql, &args)?);
    }
    Ok(out)
}

/// Whether `s` appears verbatim in the JSON text of a value holding it (JSON escapes quotes,
/// backslashes and control characters), so `instr` on the stored text can find it.
fn matchable_as_text(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|ch| ch == '"' || ch == '\\' || ch.is_control())
}

/// Active accesses whose recorded binding ids may include `binding_id` (a text match on the
/// stored list: a superset the caller checks exactly), without decoding every live access. An id
/// JSON would escape cannot be matched as text: then every live access is returned.
pub fn active_access_holding(c: &dyn Db, binding_id: &str) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    if !matchable_as_text(binding_id) {
        return live_access(c);
    }
    access_where(
        c,
        "WHERE state = 'active' AND instr(binding_ids, ?1) > 0",
        &p![binding_id],
    )
}

// ----- users the agent created -----

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedUser {
    pub integration: String,
    pub user_id: String,
    pub next_rotation_at: Option<DateTime<Utc>>,
    pub cleanup_at: Option<DateTime<Utc>>,
}

fn managed_where(
    c: &dyn Db,
    where_sql: &str,
    args: &[Val],
) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    let rows = c
        .query(
            &format!(
                "SELECT integration, user_id, next_rotation_at, cleanup_at FROM managed_users {where_sql} ORDER BY integration, user_id"
            ),
            args,
        )
        .map_err(sql("querying managed users"))?
        .iter()
        .map(|r| {
            let decoded: Result<(String, String, Option<i64>, Option<i64>), String> =
                (|| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))();
            let (integration, user_id, rot, clean) =
                decoded.map_err(|message| corrupt("managed_users", "?", message))?;
            Ok(ManagedUser {
                next_rotation_at: opt_ms("managed_users", &user_id, rot)?,
                cleanup_at: opt_ms("managed_users", &user_id, clean)?,
                integration,
                user_id,
            })
        })
        .collect();
    Ok(rows)
}

pub fn managed_user(c: &dyn Db, integration: &str, user_id: &str) -> Result<Option<ManagedUser>, StoreError> {
    managed_where(c, "WHERE integration = ?1 AND user_id = ?2", &p![integration, user_id])?
        .into_iter()
        .next()
        .transpose()
}

pub fn list_managed_users(c: &dyn Db) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    managed_where(c, "", &[])
}

pub fn due_rotations(c: &dyn Db, now: DateTime<Utc>) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    managed_where(c, "WHERE next_rotation_at <= ?1", &p![to_ms(now)])
}

pub fn due_cleanups(c: &dyn Db, now: DateTime<Utc>) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    managed_where(c, "WHERE cleanup_at <= ?1", &p![to_ms(now)])
}

pub fn upsert_managed_user(c: &dyn Db, u: &ManagedUser) -> Result<(), StoreError> {
    c.exec(
        "INSERT INTO managed_users (integration, user_id, next_rotation_at, cleanup_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (integration, user_id) DO UPDATE SET
             next_rotation_at = excluded.next_rotation_at, cleanup_at = excluded.cleanup_at",
        &p![
            u.integration,
            u.user_id,
            u.next_rotation_at.map(to_ms),
            u.cleanup_at.map(to_ms)
        ],
    )
    .map_err(sql("saving a managed user"))?;
    Ok(())
}

pub fn delete_managed_user(c: &dyn Db, integration: &str, user_id: &str) -> Result<(), StoreError> {
    c.exec(
        "DELETE FROM managed_users WHERE integration = ?1 AND user_id = ?2",
        &p![integration, user_id],
    )
    .map_err(sql("deleting a managed user"))?;
    Ok(())
}

// ----- discovery uploads -----

pub fn insert_resources(c: &dyn Db, job_id: &str, objects: &[Value]) -> Result<(), StoreError> {
    for o in objects {
        c.exec(
            "INSERT INTO resources (job_id, object) VALUES (?1, ?2)",
            &p![job_id, json_text(o)?],
        )
        .map_err(sql("saving discovered objects"))?;
    }
    Ok(())
}

/// Drops a job's uploads: they belong to the lease that made them, and a new lease starts over.
pub fn discard_resources(c: &dyn Db, job_id: &str) -> Result<usize, StoreError> {
    c.exec("DELETE FROM resources WHERE job_id = ?1", &p![job_id])
        .map_err(sql("discarding an earlier attempt's discovered objects"))
}

pub fn resources(c: &dyn Db, job_id: &str) -> Result<Vec<Value>, StoreError> {
    let rows = c
        .query(
            "SELECT seq, object FROM resources WHERE job_id = ?1 ORDER BY seq",
            &p![job_id],
        )
        .map_err(sql("reading discovered objects"))?;
    let mut out = Vec::new();
    for row in rows {
        let seq: i64 = row.get(0).map_err(|message| corrupt("resources", job_id, message))?;
        let text: String = row
            .get(1)
            .map_err(|message| corrupt("resources", &seq.to_string(), message))?;
        out.push(parse_json("resources", &seq.to_string(), "object", &text)?);
    }
    Ok(out)
}

// ----- one-time credentials (schema v5) -----
//
// A new user's password (from a grant or a rotation), sealed by `embedded::credentials`, kept on
// a shared (PostgreSQL) state only (the queries are built with `store-postgres` only), so any
// replica can hand it to the requester's first read.
// The plaintext never reaches this table; SQLite gets the (empty) table for one schema.

/// v5: the table of sealed one-time credentials, one row per access (a rotation replaces an
/// unread one). The same text on both backends (`BIGINT` is an integer in SQLite too).
const ONE_TIME_CREDENTIALS_V5: &str = "
CREATE TABLE IF NOT EXISTS one_time_credentials (
    access_id   TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    sealed      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS one_time_credentials_age ON one_time_credentials (created_at);
";

/// SQLite's v5 step (in `migrate_in_transaction`).
fn migrate_v5(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(ONE_TIME_CREDENTIALS_V5)
        .map_err(sql("creating the one-time credentials table"))
}

/// A sealed one-time credential as stored: which key sealed it and the sealed bytes (base64).
#[cfg(feature = "store-postgres")]
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRow {
    pub key_id: String,
    pub sealed: String,
    pub created_at: DateTime<Utc>,
}

// Sealed, but still nothing a log needs.
#[cfg(feature = "store-postgres")]
impl std::fmt::Debug for SealedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRow")
            .field("key_id", &self.key_id)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Keeps `access_id`'s sealed credentials, replacing unread ones (a rotation after a grant).
#[cfg(feature = "store-postgres")]
pub fn put_one_time_credentials(c: &dyn Db, access_id: &str, row: &SealedRow) -> Result<(), StoreError> {
    c.exec(
        "INSERT INTO one_time_credentials (access_id, key_id, sealed, created_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (access_id) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed,
             created_at = excluded.created_at",
        &p![access_id, row.key_id, row.sealed, to_ms(row.created_at)],
    )
    .map_err(sql("keeping sealed one-time credentials"))?;
    Ok(())
}

/// The key id of `access_id`'s sealed credentials kept since `since`, without taking them.
#[cfg(feature = "store-postgres")]
pub fn one_time_credentials_key(
    c: &dyn Db,
    access_id: &str,
    since: DateTime<Utc>,
) -> Result<Option<String>, StoreError> {
    query_opt(
        c,
        "SELECT key_id FROM one_time_credentials WHERE access_id = ?1 AND created_at >= ?2",
        &p![access_id, to_ms(since)],
    )
    .map_err(sql("reading one-time credentials"))?
    .map(|r| r.get::<String>(0))
    .transpose()
    .map_err(|message| corrupt("one_time_credentials", access_id, message))
}

/// Takes (deletes and returns) `access_id`'s credentials sealed under `key_id` since `since`.
/// One statement: of two replicas taking at once, one gets the row and the other nothing.
#[cfg(feature = "store-postgres")]
pub fn take_one_time_credentials(
    c: &dyn Db,
    access_id: &str,
    key_id: &str,
    since: DateTime<Utc>,
) -> Result<Option<SealedRow>, StoreError> {
    let Some(r) = query_opt(
        c,
        "DELETE FROM one_time_credentials WHERE access_id = ?1 AND key_id = ?2 AND created_at >= ?3
         RETURNING key_id, sealed, created_at",
        &p![access_id, key_id, to_ms(since)],
    )
    .map_err(sql("taking one-time credentials"))?
    else {
        return Ok(None);
    };
    let bad = |message| corrupt("one_time_credentials", access_id, message);
    Ok(Some(SealedRow {
        key_id: r.get(0).map_err(bad)?,
        sealed: r.get(1).map_err(bad)?,
        created_at: from_ms("one_time_credentials", access_id, r.get(2).map_err(bad)?)?,
    }))
}

/// Forgets `access_id`'s credentials (its access ended). Returns whether there were any.
#[cfg(feature = "store-postgres")]
pub fn delete_one_time_credentials(c: &dyn Db, access_id: &str) -> Result<bool, StoreError> {
    let n = c
        .exec("DELETE FROM one_time_credentials WHERE access_id = ?1", &p![access_id])
        .map_err(sql("forgetting one-time credentials"))?;
    Ok(n > 0)
}

/// Forgets credentials kept since before `cutoff` (nobody read them in time). Returns how many.
#[cfg(feature = "store-postgres")]
pub fn prune_one_time_credentials(c: &dyn Db, cutoff: DateTime<Utc>) -> Result<usize, StoreError> {
    c.exec(
        "DELETE FROM one_time_credentials WHERE created_at < ?1",
        &p![to_ms(cutoff)],
    )
    .map_err(sql("forgetting old one-time credentials"))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A store in a PostgreSQL database of its own (`None`, said on stderr, when no server can
    /// run here; under `CI=true` that fails instead).
    #[cfg(feature = "store-postgres")]
    fn postgres_store(database: &str) -> Option<Store> {
        if !testing::postgres_available() {
            return None;
        }
        let server = testing::shared().unwrap();
        let target = postgres::PgTarget::parse(&server.database(database)).unwrap();
        Some(Store::open_backend(&Backend::Postgres(Box::new(target))).unwrap())
    }

    fn queued(id: &str, kind: &str, state: JobState, at: DateTime<Utc>) -> JobRow {
        JobRow {
            id: id.into(),
            kind: kind.into(),
            integration_name: Some("sim".into()),
            integration: None,
            params: serde_json::json!({}),
            state,
            attempt: 0,
            lease_token: None,
            lease_expires_at: (state == JobState::Leased).then_some(at),
            not_before: None,
            completed_token: None,
            result: None,
            error: None,
            access_id: None,
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn a_job_is_read_with_its_access_request_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        a_job_is_read_with_its_access_request(&Store::open(dir.path()).unwrap());
    }

    #[cfg(feature = "store-postgres")]
    #[test]
    fn a_job_is_read_with_its_access_request_postgres() {
        if let Some(store) = postgres_store("t_job_with_access") {
            a_job_is_read_with_its_access_request(&store);
        }
    }

    /// What a completion reads in one query: the job, and the access it serves (none, gone, or a
    /// row that does not decode, each told apart).
    fn a_job_is_read_with_its_access_request(store: &Store) {
        let c = store.lock().unwrap();
        let t = DateTime::from_timestamp_millis(1_700_000_000_000).unwrap();
        let access = AccessRow {
            id: "ar-1".into(),
            integration: "sim".into(),
            subject: Subject::user("alice"),
            role: "cluster-member".into(),
            resource: Resource::Cluster("c-1".into()),
            ttl_seconds: 60,
            create_user: false,
            state: AccessState::Active,
            created_at: t,
            granted_at: Some(t),
            expires_at: Some(t),
            revoked_at: None,
            grant_job_id: "grant-1".into(),
            revoke_job_id: Some("revoke-1".into()),
            user_id: Some("u-alice".into()),
            binding_ids: vec!["c-1:crtb-1".into()],
            access_details: None,
            last_error: None,
            revoke_requested: false,
            integration_spec: None,
            pre_existing: false,
            bound_subject: None,
            owner: None,
            note: Some("a note".into()),
        };
        insert_access(&*c, &access).unwrap();
        let serving = |id: &str, access: &str| JobRow {
            access_id: Some(access.into()),
            params: serde_json::json!({"grant_id": access}),
            ..queued(id, "revoke", JobState::Leased, t)
        };
        for job in [
            serving("revoke-1", "ar-1"),
            serving("revoke-gone", "ar-gone"),
            serving("revoke-corrupt", "ar-corrupt"),
            queued("discover-1", "discover", JobState::Pending, t),
        ] {
            insert_job(&*c, &job).unwrap();
        }
        let mut corrupt_row = access.clone();
        corrupt_row.id = "ar-corrupt".into();
        insert_access(&*c, &corrupt_row).unwrap();
        c.exec(
            "UPDATE access_requests SET state = 'sideways' WHERE id = 'ar-corrupt'",
            &[],
        )
        .unwrap();

        let (job, read) = job_with_access(&*c, "revoke-1").unwrap().unwrap();
        // Field by field, as the two single-table reads give them.
        assert_eq!(format!("{job:?}"), format!("{:?}", job_row(&*c, "revoke-1")));
        assert_eq!(
            format!("{:?}", read.unwrap().unwrap()),
            format!("{:?}", access_row(&*c, "ar-1"))
        );
        let (job, read) = job_with_access(&*c, "revoke-gone").unwrap().unwrap();
        assert_eq!(job.access_id.as_deref(), Some("ar-gone"));
        assert!(read.is_none(), "no access row");
        let (_, read) = job_with_access(&*c, "revoke-corrupt").unwrap().unwrap();
        let e = read.expect("a row").unwrap_err();
        assert_eq!(e.corrupt_key(), Some("ar-corrupt"), "{e}");
        let (job, read) = job_with_access(&*c, "discover-1").unwrap().unwrap();
        assert_eq!(job.kind, "discover");
        assert!(read.is_none(), "serves no access");
        assert!(job_with_access(&*c, "nope").unwrap().is_none());
    }

    fn job_row(c: &dyn Db, id: &str) -> JobRow {
        job(c, id).unwrap().unwrap()
    }

    fn access_row(c: &dyn Db, id: &str) -> AccessRow {
        super::access(c, id).unwrap().unwrap()
    }

    /// Revokes, then grants, then the rest; oldest first within each; expired leases among the
    /// pending by the same rule; a live lease, a backoff not yet over and finished jobs never.
    #[test]
    fn ready_jobs_come_in_hand_out_order_from_both_states_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        ready_jobs_come_in_hand_out_order(&Store::open(dir.path()).unwrap());
    }

    #[cfg(feature = "store-postgres")]
    #[test]
    fn ready_jobs_come_in_hand_out_order_from_both_states_postgres() {
        if let Some(store) = postgres_store("t_ready_jobs_order") {
            ready_jobs_come_in_hand_out_order(&store);
        }
    }

    fn ready_jobs_come_in_hand_out_order(store: &Store) {
        let c = store.lock().unwrap();
        let t = Utc::now();
        let past = t - chrono::TimeDelta::seconds(5);
        let future = t + chrono::TimeDelta::seconds(60);
        let mut backoff = queued("revoke-backing-off", "revoke", JobState::Pending, past);
        backoff.not_before = Some(future);
        let mut live_lease = queued("grant-leased-live", "grant", JobState::Leased, past);
        live_lease.lease_expires_at = Some(future);
        for job in [
            queued("discover-1", "discover", JobState::Pending, past),
            queued("grant-1", "grant", JobState::Pending, past),
            backoff,
            queued("revoke-lease-expired", "revoke", JobState::Leased, past),
            live_lease,
            queued("grant-lease-expired", "grant", JobState::Leased, past),
            queued("revoke-2", "revoke", JobState::Pending, past),
            queued("grant-done", "grant", JobState::Succeeded, past),
            queued("sweep-1", "sweep", JobState::Pending, past),
        ] {
            insert_job(&*c, &job).unwrap();
        }
        let ids = |limit| -> Vec<String> {
            ready_jobs(&*c, t, limit)
                .unwrap()
                .into_iter()
                .map(|j| j.unwrap().id)
                .collect()
        };
        assert_eq!(
            ids(10),
            [
                "revoke-lease-expired",
                "revoke-2",
                "grant-1",
                "grant-lease-expired",
                "discover-1",
                "sweep-1"
            ]
        );
        assert_eq!(ids(3), ["revoke-lease-expired", "revoke-2", "grant-1"]);
        assert_eq!(ids(1), ["revoke-lease-expired"]);
        assert!(any_ready_job(&*c, t).unwrap());
    }

    /// What the follower's tick asks: a new job (no backoff time) and an expired lease are ready;
    /// a job backing off, a live lease and a finished job are not.
    #[test]
    fn any_ready_job_sees_a_new_job_and_an_expired_lease() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = store.lock().unwrap();
        let t = Utc::now();
        let past = t - chrono::TimeDelta::seconds(5);
        let future = t + chrono::TimeDelta::seconds(60);
        assert!(!any_ready_job(&*c, t).unwrap());
        let mut backoff = queued("backing-off", "revoke", JobState::Pending, past);
        backoff.not_before = Some(future);
        let mut live = queued("leased-live", "grant", JobState::Leased, past);
        live.lease_expires_at = Some(future);
        for job in [backoff, live, queued("done", "grant", JobState::Succeeded, past)] {
            insert_job(&*c, &job).unwrap();
        }
        assert!(!any_ready_job(&*c, t).unwrap());
        insert_job(&*c, &queued("lease-expired", "revoke", JobState::Leased, past)).unwrap();
        assert!(any_ready_job(&*c, t).unwrap());
        c.exec("DELETE FROM jobs WHERE id = 'lease-expired'", &[]).unwrap();
        insert_job(&*c, &queued("new", "revoke", JobState::Pending, past)).unwrap();
        assert!(any_ready_job(&*c, t).unwrap());
        // The check the tick made before: it never saw the new job.
        assert_eq!(next_ready_at(&*c).unwrap().map(to_ms), Some(to_ms(future)));
    }

    /// A cached statement is compiled once, whatever is bound to it: the subject lookup's shape
    /// (an `OR` of two parameters) and a `LIMIT ?` were compiled again at every new value.
    #[test]
    fn cached_statements_are_not_compiled_again_for_new_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = store.lock().unwrap();
        let conn = c.sqlite().unwrap();
        let sql = "SELECT id FROM access_requests WHERE (subject_name = ?1 OR subject_key = ?2) \
                   AND state IN ('pending', 'active', 'revoking') AND id <> ?3 ORDER BY seq LIMIT ?4";
        for (i, limit) in [(0, 1), (1, 5), (2, 1), (3, 100)] {
            let mut stmt = conn.prepare_cached(sql).unwrap();
            let rows = stmt
                .query_map(
                    rusqlite::params![format!("user{i}"), format!("key{i}"), format!("ar{i}"), limit],
                    |r| r.get::<_, String>(0),
                )
                .unwrap()
                .count();
            assert_eq!(rows, 0);
        }
        let stmt = conn.prepare_cached(sql).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::Run), 4);
    }

    /// A lease reads the queue in order from its index and stops at its limit: no sort of every
    /// queued job (1,000 queued grants made each lease of one job read them all).
    #[test]
    fn the_ready_queue_is_an_ordered_index_walk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = store.lock().unwrap();
        let conn = c.sqlite().unwrap();
        for state in [
            "state = 'pending' AND (not_before IS NULL OR not_before <= 1)",
            "state = 'leased' AND lease_expires_at <= 1",
        ] {
            let sql =
                format!("EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE {state} ORDER BY {QUEUE_RANK}, seq LIMIT 1");
            let mut stmt = conn.prepare(&sql).unwrap();
            let plan = stmt
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ");
            assert!(plan.contains("jobs_queue") && !plan.contains("TEMP B-TREE"), "{plan}");
        }
    }

    #[test]
    fn a_database_readable_by_others_stops_start_up_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let db = dir.path().join(DB_FILE);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Store::open(dir.path()).err().expect("refused").to_string();
        assert!(
            e.contains(&db.display().to_string()) && e.contains("chmod 600") && e.contains("644"),
            "{e}"
        );
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
        Store::open(dir.path()).expect("opens once fixed");
    }

    #[test]
    fn a_data_dir_that_is_not_writable_stops_start_up_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o500)).unwrap();
        let e = Store::open(&data).err().expect("refused").to_string();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(
            e.contains(&data.display().to_string()) && e.contains("not writable") && e.contains("APONO_DATA_DIR"),
            "{e}"
        );
        Store::open(&data).expect("opens once fixed");
    }
}
