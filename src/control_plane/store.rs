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
//! **Architecture invariant:** no secret a grant generates is written here: `embedded` strips
//! `credentials` from results before they reach [`JobRow::result`]. The one secret this file can
//! hold is an inline `APONO` integration's credentials, which is why it is created with mode 0600.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;

use super::ControlPlaneError;
use super::data_dir::{DataDirError, check_writable, create_dir, create_private_file, lock_data_dir};
use super::operator::{AccessState, JobState};
use super::protocol::JobError;
use crate::integrations::{BoundSubject, Owner, Resource, Subject};

/// Version of the schema below. Bump it and add a migration step in [`migrate`] when it changes.
pub const SCHEMA_VERSION: i64 = 3;

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
    note              TEXT
);
CREATE INDEX IF NOT EXISTS access_due ON access_requests (state, expires_at);
CREATE INDEX IF NOT EXISTS access_key ON access_requests (integration, role, resource, state);
CREATE INDEX IF NOT EXISTS access_binding ON access_requests (role, resource, state);
CREATE INDEX IF NOT EXISTS jobs_access ON jobs (access_id, kind, state);
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
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
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
}

impl StoreError {
    /// The key of a corrupt row, when known.
    pub fn corrupt_key(&self) -> Option<&str> {
        match self {
            StoreError::Corrupt { key, .. } if key != "?" => Some(key),
            _ => None,
        }
    }
}

impl From<StoreError> for ControlPlaneError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InUse(message) => ControlPlaneError::InUse { message },
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

/// Shorthand for wrapping a rusqlite error with what was being done.
pub fn sql(context: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        context: context.to_string(),
        source,
    }
}

/// The SQLite file and its one connection.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Exclusive lock on `data_dir/lock`, released when the store is dropped (or the process
    /// dies). Two control planes on one state would each keep one-time credentials the other
    /// never sees, and `reclaim_leases` at start is only right when nobody else holds leases.
    _lock: std::fs::File,
}

impl Store {
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
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            path,
            _lock: lock,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection. A poisoned lock (a panic while it was held) is recovered: SQLite rolled
    /// back whatever transaction was open, so the state is consistent.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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

/// The id of this control plane's state, made once (uuid v7, simple form) and kept in `meta`:
/// with the connector id it names the owner of every binding the connector makes.
pub fn install_id(c: &Connection) -> Result<String, StoreError> {
    let fresh = uuid::Uuid::now_v7().simple().to_string();
    c.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('install_id', ?1)",
        [&fresh],
    )
    .map_err(sql("writing the install id"))?;
    c.query_row("SELECT value FROM meta WHERE key = 'install_id'", [], |r| r.get(0))
        .map_err(sql("reading the install id"))
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
    c: &Connection,
    name: &str,
    spec: &Value,
    source: IntegrationSource,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO integrations (name, spec, updated_at, source) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at,
             source = excluded.source",
        params![name, json_text(spec)?, to_ms(now), source.as_str()],
    )
    .map_err(sql("saving an integration"))?;
    Ok(())
}

/// The registered spec and where it came from.
pub fn integration_with_source(c: &Connection, name: &str) -> Result<Option<(Value, IntegrationSource)>, StoreError> {
    let row: Option<(String, String)> = c
        .query_row("SELECT spec, source FROM integrations WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(sql("reading an integration"))?;
    let Some((text, source)) = row else { return Ok(None) };
    let spec = parse_json("integrations", name, "spec", &text)?;
    let source = if source == "inline" {
        IntegrationSource::Inline
    } else {
        IntegrationSource::Config
    };
    Ok(Some((spec, source)))
}

/// The registered spec, as JSON (including inline credentials, to hand to the agent).
pub fn integration(c: &Connection, name: &str) -> Result<Option<Value>, StoreError> {
    let text: Option<String> = c
        .query_row("SELECT spec FROM integrations WHERE name = ?1", [name], |r| r.get(0))
        .optional()
        .map_err(sql("reading an integration"))?;
    opt_json("integrations", name, "spec", text)
}

pub fn integration_names(c: &Connection) -> Result<Vec<String>, StoreError> {
    let mut stmt = c
        .prepare("SELECT name FROM integrations ORDER BY name")
        .map_err(sql("listing integrations"))?;
    let names = stmt
        .query_map([], |r| r.get(0))
        .map_err(sql("listing integrations"))?
        .collect::<Result<Vec<String>, _>>()
        .map_err(sql("listing integrations"))?;
    Ok(names)
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

fn raw_job(r: &Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob {
        id: r.get(0)?,
        kind: r.get(1)?,
        integration_name: r.get(2)?,
        integration: r.get(3)?,
        params: r.get(4)?,
        state: r.get(5)?,
        attempt: r.get(6)?,
        lease_token: r.get(7)?,
        lease_expires_at: r.get(8)?,
        not_before: r.get(9)?,
        completed_token: r.get(10)?,
        result: r.get(11)?,
        error: r.get(12)?,
        access_id: r.get(13)?,
        created_at: r.get(14)?,
        updated_at: r.get(15)?,
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

pub fn insert_job(c: &Connection, j: &JobRow) -> Result<(), StoreError> {
    c.execute(
        &format!("INSERT INTO jobs ({JOB_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"),
        params![
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
pub fn update_job(c: &Connection, j: &JobRow) -> Result<(), StoreError> {
    c.execute(
        "UPDATE jobs SET state = ?2, attempt = ?3, lease_token = ?4, lease_expires_at = ?5, not_before = ?6,
             completed_token = ?7, result = ?8, error = ?9, updated_at = ?10, params = ?11
         WHERE id = ?1",
        params![
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

pub fn job(c: &Connection, id: &str) -> Result<Option<JobRow>, StoreError> {
    let raw = c
        .query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), [id], raw_job)
        .optional()
        .map_err(|source| StoreError::Corrupt {
            table: "jobs",
            key: id.to_string(),
            message: source.to_string(),
        })?;
    raw.map(RawJob::decode).transpose()
}

/// Rows matching `where_sql`, oldest first. Rows that do not decode are returned as errors in
/// place, so one corrupt row cannot hide the others.
fn jobs_where(
    c: &Connection,
    where_sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    let mut stmt = c
        .prepare(&format!("SELECT {JOB_COLUMNS} FROM jobs {where_sql}"))
        .map_err(sql("querying jobs"))?;
    let rows = stmt
        .query_map(args, raw_job)
        .map_err(sql("querying jobs"))?
        .map(|r| match r {
            Ok(raw) => raw.decode(),
            Err(e) => Err(StoreError::Corrupt {
                table: "jobs",
                key: "?".into(),
                message: e.to_string(),
            }),
        })
        .collect();
    Ok(rows)
}

pub fn list_jobs(c: &Connection) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    jobs_where(c, "ORDER BY seq", &[])
}

/// Jobs that may be handed out at `now`: pending and past their backoff, or leased with an
/// expired lease. Revokes first (access ends on time however long the queue), then grants, then
/// the rest (discovery, sweeps, rotations); oldest first within each; at most `limit`.
pub fn ready_jobs(
    c: &Connection,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    let now = to_ms(now);
    jobs_where(
        c,
        "WHERE (state = 'pending' AND (not_before IS NULL OR not_before <= ?1))
            OR (state = 'leased' AND lease_expires_at <= ?1)
         ORDER BY CASE kind WHEN 'revoke' THEN 0 WHEN 'grant' THEN 1 ELSE 2 END, seq LIMIT ?2",
        &[&now, &i64::from(limit)],
    )
}

/// Sweep jobs not yet settled (pending or leased).
pub fn open_sweeps(c: &Connection) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    jobs_where(
        c,
        "WHERE kind = 'sweep' AND state IN ('pending', 'leased') ORDER BY seq",
        &[],
    )
}

/// Jobs of one kind serving access `access_id` that have not settled (pending or leased).
pub fn open_jobs_of_access(
    c: &Connection,
    access_id: &str,
    kind: &str,
) -> Result<Vec<Result<JobRow, StoreError>>, StoreError> {
    jobs_where(
        c,
        "WHERE access_id = ?1 AND kind = ?2 AND state IN ('pending', 'leased') ORDER BY seq",
        &[&access_id, &kind],
    )
}

/// Every leased job becomes pending at once (lease cleared, attempt kept). Returns how many.
pub fn reclaim_leases(c: &Connection, now: DateTime<Utc>) -> Result<usize, StoreError> {
    c.execute(
        "UPDATE jobs SET state = 'pending', lease_token = NULL, lease_expires_at = NULL, not_before = NULL,
             updated_at = ?1
         WHERE state = 'leased'",
        [to_ms(now)],
    )
    .map_err(sql("handing back the leases of a dead process"))
}

/// Marks a job whose row does not decode as failed for good, touching only columns that cannot
/// be corrupt, so it stops being looked at.
pub fn fail_corrupt_job(c: &Connection, id: &str, message: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
    let error = JobError {
        code: "corrupt_job".into(),
        message: message.to_string(),
        retryable: false,
    };
    c.execute(
        "UPDATE jobs SET state = 'failed', lease_token = NULL, lease_expires_at = NULL, not_before = NULL,
             error = ?2, updated_at = ?3
         WHERE id = ?1",
        params![id, json_text(&error)?, to_ms(now)],
    )
    .map_err(sql("marking a corrupt job failed"))?;
    Ok(())
}

/// The earliest time a job not ready now becomes ready (a backoff ending, a lease running out).
pub fn next_ready_at(c: &Connection) -> Result<Option<DateTime<Utc>>, StoreError> {
    let ms: Option<i64> = c
        .query_row(
            "SELECT MIN(t) FROM (
                 SELECT not_before AS t FROM jobs WHERE state = 'pending' AND not_before IS NOT NULL
                 UNION ALL
                 SELECT lease_expires_at AS t FROM jobs WHERE state = 'leased' AND lease_expires_at IS NOT NULL)",
            [],
            |r| r.get(0),
        )
        .map_err(sql("reading the next job time"))?;
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

const ACCESS_COLUMNS: &str = "id, integration, subject, role, resource, ttl_seconds, create_user, state, created_at, \
     granted_at, expires_at, revoked_at, grant_job_id, revoke_job_id, user_id, binding_ids, access_details, \
     last_error, revoke_requested, integration_spec, pre_existing, bound_subject, owner, note";

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

fn raw_access(r: &Row<'_>) -> rusqlite::Result<RawAccess> {
    Ok(RawAccess {
        id: r.get(0)?,
        integration: r.get(1)?,
        subject: r.get(2)?,
        role: r.get(3)?,
        resource: r.get(4)?,
        ttl_seconds: r.get(5)?,
        create_user: r.get(6)?,
        state: r.get(7)?,
        created_at: r.get(8)?,
        granted_at: r.get(9)?,
        expires_at: r.get(10)?,
        revoked_at: r.get(11)?,
        grant_job_id: r.get(12)?,
        revoke_job_id: r.get(13)?,
        user_id: r.get(14)?,
        binding_ids: r.get(15)?,
        access_details: r.get(16)?,
        last_error: r.get(17)?,
        revoke_requested: r.get(18)?,
        integration_spec: r.get(19)?,
        pre_existing: r.get(20)?,
        bound_subject: r.get(21)?,
        owner: r.get(22)?,
        note: r.get(23)?,
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

pub fn insert_access(c: &Connection, a: &AccessRow) -> Result<(), StoreError> {
    c.execute(
        &format!(
            "INSERT INTO access_requests ({ACCESS_COLUMNS}) VALUES
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21,
              ?22, ?23, ?24)"
        ),
        params![
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
        ],
    )
    .map_err(sql("inserting an access request"))?;
    Ok(())
}

/// Writes the mutable columns of an access request.
pub fn update_access(c: &Connection, a: &AccessRow) -> Result<(), StoreError> {
    c.execute(
        "UPDATE access_requests SET state = ?2, granted_at = ?3, expires_at = ?4, revoked_at = ?5, revoke_job_id = ?6,
             user_id = ?7, binding_ids = ?8, access_details = ?9, last_error = ?10, revoke_requested = ?11,
             pre_existing = ?12, bound_subject = ?13, owner = ?14, note = ?15
         WHERE id = ?1",
        params![
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
        ],
    )
    .map_err(sql("updating an access request"))?;
    Ok(())
}

pub fn access(c: &Connection, id: &str) -> Result<Option<AccessRow>, StoreError> {
    let raw = c
        .query_row(
            &format!("SELECT {ACCESS_COLUMNS} FROM access_requests WHERE id = ?1"),
            [id],
            raw_access,
        )
        .optional()
        .map_err(|source| StoreError::Corrupt {
            table: "access_requests",
            key: id.to_string(),
            message: source.to_string(),
        })?;
    raw.map(RawAccess::decode).transpose()
}

fn access_where(
    c: &Connection,
    where_sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    let mut stmt = c
        .prepare(&format!(
            "SELECT {ACCESS_COLUMNS} FROM access_requests {where_sql} ORDER BY seq"
        ))
        .map_err(sql("querying access requests"))?;
    let rows = stmt
        .query_map(args, raw_access)
        .map_err(sql("querying access requests"))?
        .map(|r| match r {
            Ok(raw) => raw.decode(),
            Err(e) => Err(StoreError::Corrupt {
                table: "access_requests",
                key: "?".into(),
                message: e.to_string(),
            }),
        })
        .collect();
    Ok(rows)
}

pub fn list_access(c: &Connection) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(c, "", &[])
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
pub fn prune(c: &Connection, cutoff: DateTime<Utc>) -> Result<Pruned, StoreError> {
    let cutoff = to_ms(cutoff);
    let ended_access = "SELECT id FROM access_requests WHERE state IN ('revoked', 'failed') \
                        AND COALESCE(revoked_at, created_at) < ?1";
    let old_job = format!(
        "state IN ('succeeded', 'failed') AND updated_at < ?1 \
         AND (access_id IS NULL OR access_id IN ({ended_access}))"
    );
    let resources = c
        .execute(
            &format!("DELETE FROM resources WHERE job_id IN (SELECT id FROM jobs WHERE {old_job})"),
            [cutoff],
        )
        .map_err(sql("pruning discovered objects"))?;
    let jobs = c
        .execute(&format!("DELETE FROM jobs WHERE {old_job}"), [cutoff])
        .map_err(sql("pruning finished jobs"))?;
    let access_requests = c
        .execute(
            &format!(
                "DELETE FROM access_requests WHERE id IN ({ended_access}) \
                 AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.access_id = access_requests.id)"
            ),
            [cutoff],
        )
        .map_err(sql("pruning ended access requests"))?;
    Ok(Pruned {
        jobs,
        resources,
        access_requests,
    })
}

/// The earliest expiry of an active access (the `access_due` index: no scan).
pub fn next_expiry(c: &Connection) -> Result<Option<DateTime<Utc>>, StoreError> {
    let ms: Option<i64> = c
        .query_row(
            "SELECT MIN(expires_at) FROM access_requests WHERE state = 'active' AND expires_at IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .map_err(sql("reading the next expiry"))?;
    opt_ms("access_requests", "(next expiry)", ms)
}

/// Active accesses whose TTL has ended.
pub fn expired_access(c: &Connection, now: DateTime<Utc>) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(c, "WHERE state = 'active' AND expires_at <= ?1", &[&to_ms(now)])
}

/// Accesses of one Rancher user (by the user id the grant reported) on one integration.
pub fn access_of_user(
    c: &Connection,
    integration: &str,
    user_id: &str,
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(c, "WHERE integration = ?1 AND user_id = ?2", &[&integration, &user_id])
}

/// Accesses that have not ended (pending, active or revoking), oldest first.
pub fn live_access(c: &Connection) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(c, "WHERE state IN ('pending', 'active', 'revoking')", &[])
}

/// Accesses that have not ended on one (role, resource), on any integration, oldest first: the
/// candidates for sharing a binding (the caller compares their Rancher and subject).
pub fn live_access_on(
    c: &Connection,
    role: &str,
    resource: &Resource,
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    access_where(
        c,
        "WHERE role = ?1 AND resource = ?2 AND state IN ('pending', 'active', 'revoking')",
        &[&role, &resource.as_str()],
    )
}

/// Accesses that have not ended (on one (role, resource), when given) that may name the subject
/// `names` spells: its subject string and its binding key's value. A superset of the accesses
/// that share a subject (the caller decides with the full rule), found without decoding every
/// live access: a mass expiry on one role would otherwise read them all for each one that ends.
/// A name JSON would escape (or an empty one) cannot be matched as text: then every live access
/// is returned, as before.
pub fn live_access_naming(
    c: &Connection,
    on: Option<(&str, &Resource)>,
    names: [&str; 2],
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    let live = "state IN ('pending', 'active', 'revoking')";
    let named = "(instr(subject, ?1) > 0 OR instr(COALESCE(bound_subject, ''), ?1) > 0 OR user_id = ?1
         OR instr(subject, ?2) > 0 OR instr(COALESCE(bound_subject, ''), ?2) > 0 OR user_id = ?2)";
    match (on, names.iter().all(|n| matchable_as_text(n))) {
        (Some((role, resource)), true) => access_where(
            c,
            &format!("WHERE role = ?3 AND resource = ?4 AND {live} AND {named}"),
            &[&names[0], &names[1], &role, &resource.as_str()],
        ),
        (None, true) => access_where(c, &format!("WHERE {live} AND {named}"), &[&names[0], &names[1]]),
        (Some((role, resource)), false) => live_access_on(c, role, resource),
        (None, false) => live_access(c),
    }
}

/// Whether `s` appears verbatim in the JSON text of a value holding it (JSON escapes quotes,
/// backslashes and control characters), so `instr` on the stored text can find it.
fn matchable_as_text(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|ch| ch == '"' || ch == '\\' || ch.is_control())
}

/// Active accesses whose recorded binding ids may include `binding_id` (a text match on the
/// stored list: a superset the caller checks exactly), without decoding every live access. An id
/// JSON would escape cannot be matched as text: then every live access is returned.
pub fn active_access_holding(
    c: &Connection,
    binding_id: &str,
) -> Result<Vec<Result<AccessRow, StoreError>>, StoreError> {
    if !matchable_as_text(binding_id) {
        return live_access(c);
    }
    access_where(
        c,
        "WHERE state = 'active' AND instr(binding_ids, ?1) > 0",
        &[&binding_id],
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
    c: &Connection,
    where_sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    let mut stmt = c
        .prepare(&format!(
            "SELECT integration, user_id, next_rotation_at, cleanup_at FROM managed_users {where_sql} ORDER BY integration, user_id"
        ))
        .map_err(sql("querying managed users"))?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .map_err(sql("querying managed users"))?
        .map(|r| {
            let (integration, user_id, rot, clean) = r.map_err(|e| StoreError::Corrupt {
                table: "managed_users",
                key: "?".into(),
                message: e.to_string(),
            })?;
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

pub fn managed_user(c: &Connection, integration: &str, user_id: &str) -> Result<Option<ManagedUser>, StoreError> {
    managed_where(c, "WHERE integration = ?1 AND user_id = ?2", &[&integration, &user_id])?
        .into_iter()
        .next()
        .transpose()
}

pub fn list_managed_users(c: &Connection) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    managed_where(c, "", &[])
}

pub fn due_rotations(c: &Connection, now: DateTime<Utc>) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    managed_where(c, "WHERE next_rotation_at <= ?1", &[&to_ms(now)])
}

pub fn due_cleanups(c: &Connection, now: DateTime<Utc>) -> Result<Vec<Result<ManagedUser, StoreError>>, StoreError> {
    managed_where(c, "WHERE cleanup_at <= ?1", &[&to_ms(now)])
}

pub fn upsert_managed_user(c: &Connection, u: &ManagedUser) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO managed_users (integration, user_id, next_rotation_at, cleanup_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (integration, user_id) DO UPDATE SET
             next_rotation_at = excluded.next_rotation_at, cleanup_at = excluded.cleanup_at",
        params![
            u.integration,
            u.user_id,
            u.next_rotation_at.map(to_ms),
            u.cleanup_at.map(to_ms)
        ],
    )
    .map_err(sql("saving a managed user"))?;
    Ok(())
}

pub fn delete_managed_user(c: &Connection, integration: &str, user_id: &str) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM managed_users WHERE integration = ?1 AND user_id = ?2",
        params![integration, user_id],
    )
    .map_err(sql("deleting a managed user"))?;
    Ok(())
}

// ----- discovery uploads -----

pub fn insert_resources(c: &Connection, job_id: &str, objects: &[Value]) -> Result<(), StoreError> {
    let mut stmt = c
        .prepare_cached("INSERT INTO resources (job_id, object) VALUES (?1, ?2)")
        .map_err(sql("saving discovered objects"))?;
    for o in objects {
        stmt.execute(params![job_id, json_text(o)?])
            .map_err(sql("saving discovered objects"))?;
    }
    Ok(())
}

/// Drops a job's uploads: they belong to the lease that made them, and a new lease starts over.
pub fn discard_resources(c: &Connection, job_id: &str) -> Result<usize, StoreError> {
    c.execute("DELETE FROM resources WHERE job_id = ?1", [job_id])
        .map_err(sql("discarding an earlier attempt's discovered objects"))
}

pub fn resources(c: &Connection, job_id: &str) -> Result<Vec<Value>, StoreError> {
    let mut stmt = c
        .prepare("SELECT seq, object FROM resources WHERE job_id = ?1 ORDER BY seq")
        .map_err(sql("reading discovered objects"))?;
    let rows = stmt
        .query_map([job_id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .map_err(sql("reading discovered objects"))?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, text) = row.map_err(sql("reading discovered objects"))?;
        out.push(parse_json("resources", &seq.to_string(), "object", &text)?);
    }
    Ok(out)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
