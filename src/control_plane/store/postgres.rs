//! The PostgreSQL connection behind [`Db`](super::db::Db) (feature `store-postgres`).
//!
//! Why blocking calls on an async driver: the control plane's rules are synchronous code that
//! runs each change as one short transaction under a lock (see `embedded`), on SQLite and here
//! alike. tokio-postgres's `Client` only queues requests to its `Connection`, so a private
//! one-thread runtime drives the connection and the caller waits on the client's futures from
//! its own thread (see [`wait`]: off the runtime worker when the wait is long): that works from
//! inside the daemon's runtime and from a test's current-thread runtime, where the `postgres`
//! crate's own `block_on` would panic. Writes inside a transaction are pipelined (see
//! [`PgConn`]'s `pending`).
//!
//! Every write transaction takes one transaction-level advisory lock first: writers on every
//! replica are serialised exactly as SQLite's `BEGIN IMMEDIATE` serialises them in one process,
//! so the lease, completion and access rules need no second version for concurrent writers
//! (each transaction is a handful of indexed statements). The ready-jobs query still says
//! `FOR UPDATE SKIP LOCKED`, so a job is never handed to two replicas even by a reader outside
//! that lock.
//!
//! A commit that makes jobs ready also sends `NOTIFY` on [`READY_CHANNEL`]; each replica's
//! leader-lock connection `LISTEN`s on it, so the other replicas' long-polls wake at once.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Statement};

use super::StoreError;
use super::db::{Db, DbError, DbRow, Dialect, Val};

/// Key of the transaction advisory lock every write transaction takes (any constant: it only has
/// to be the same on every replica, and not used by other software on the database).
pub const WRITE_LOCK_KEY: i64 = 0x6170_6f6e_6f5f_7731; // "apono_w1"

/// Key of the session advisory lock the replica that runs the scheduler holds.
pub const LEADER_LOCK_KEY: i64 = 0x6170_6f6e_6f5f_6c31; // "apono_l1"

/// The channel a replica announces "jobs became ready" on (`NOTIFY`, sent with the commit that
/// queued them), so the other replicas' long-polls wake at once instead of at their next tick.
pub const READY_CHANNEL: &str = "apono_jobs_ready";

/// How long a connection attempt may take before the database counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a URL names a PostgreSQL database (as opposed to something else in the setting).
pub fn is_postgres_url(url: &str) -> bool {
    let url = url.trim_start();
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A parsed database URL: driver settings and TLS. Its `Debug` shows no password.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// `host:port/db` for messages (no user, no password).
    display: String,
    /// Where the URL came from, when a file: read again before each new connection.
    pub url_file: Option<PathBuf>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("database", &self.display)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Parses `postgres://user:password@host:port/db?sslmode=verify-full&sslrootcert=/ca.pem`.
    /// `sslmode`: `disable` (or absent) connects in plain text; `verify-full` (and `verify-ca`,
    /// which is checked as strictly) connects over TLS verified against `sslrootcert`; `require`,
    /// `prefer` and `allow` are refused: encryption without verification can be intercepted.
    ///
    /// # Errors
    /// `StoreError::Config` naming the part that is wrong, never the URL itself (it holds the
    /// password).
    pub fn parse(url: &SecretString) -> Result<PgTarget, StoreError> {
        let bad = |why: &str| {
            StoreError::Config(format!(
                "standalone.database_url (APONO_DATABASE_URL) {why}: expected \
                 postgres://USER:PASSWORD@HOST:PORT/DATABASE[?sslmode=verify-full&sslrootcert=/path/ca.pem]"
            ))
        };
        let raw = url.expose_secret().trim();
        if !is_postgres_url(raw) {
            return Err(bad("is not a postgres:// URL"));
        }
        let mut parsed = url::Url::parse(raw).map_err(|e| bad(&format!("does not parse ({e})")))?;
        let mut sslmode = None;
        let mut rootcert = None;
        let mut kept: Vec<(String, String)> = Vec::new();
        for (k, v) in parsed.query_pairs() {
            match &*k {
                "sslmode" => sslmode = Some(v.into_owned()),
                "sslrootcert" => rootcert = Some(v.into_owned()),
                _ => kept.push((k.into_owned(), v.into_owned())),
            }
        }
        if kept.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
        let display = format!(
            "{}:{}{}",
            parsed.host_str().unwrap_or("localhost"),
            parsed.port().unwrap_or(5432),
            parsed.path()
        );
        let mut config: tokio_postgres::Config = parsed
            .as_str()
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(&format!("has a setting the driver refuses ({e})")))?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(Duration::from_secs(30))
            .application_name("apono-connector");
        let tls = match sslmode.as_deref() {
            None | Some("disable") => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                None
            }
            Some("verify-full" | "verify-ca") => {
                let Some(path) = rootcert else {
                    return Err(bad(
                        "says sslmode=verify-full without sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate)",
                    ));
                };
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(tls_connector(Path::new(&path))?)
            }
            Some(other) => {
                return Err(bad(&format!(
                    "says sslmode={other}: use sslmode=verify-full with sslrootcert=/path/to/ca.pem \
                     (an encrypted connection that is not verified can be intercepted), or sslmode=disable \
                     on a network you trust"
                )));
            }
        };
        Ok(PgTarget {
            config,
            tls,
            display,
            url_file: None,
        })
    }

    /// `host:port/db`, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }
}

/// The URL in `path` (a mounted Secret), trimmed.
///
/// # Errors
/// `Config` when the file cannot be read or is empty (the message names the file, not its text).
pub fn read_url_file(path: &Path) -> Result<SecretString, StoreError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| StoreError::Config(format!("cannot read APONO_DATABASE_URL_FILE {}: {e}", path.display())))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(StoreError::Config(format!(
            "APONO_DATABASE_URL_FILE {} is empty: it must hold the postgres:// URL",
            path.display()
        )));
    }
    Ok(SecretString::from(text.to_string()))
}

fn tls_connector(ca: &Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::pem::PemObject;
    let bad = |why: String| {
        StoreError::Config(format!(
            "the database CA file {} (sslrootcert) {why}: give a PEM file with the CA that signed the server's certificate",
            ca.display()
        ))
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs =
        rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| bad(format!("cannot be read ({e})")))?;
    for cert in certs {
        let cert = cert.map_err(|e| bad(format!("is not PEM ({e})")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("holds a certificate rustls refuses ({e})")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("cannot be used ({e})")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A client whose connection runs on the store's private runtime.
pub struct PgConn {
    client: Arc<Client>,
    /// Prepared statements by their SQLite spelling (one prepare per statement per connection).
    statements: RefCell<HashMap<String, Statement>>,
    /// Inside a write transaction: statements sent without waiting for their answer (the
    /// transaction's start, writes whose row count nobody reads). Each later statement travels
    /// behind them on the same connection; their answers are collected with its answer, and the
    /// first error among them is what that statement (or the commit) reports.
    pending: RefCell<Vec<Pending>>,
    /// Whether a transaction is open (set by `BEGIN`, cleared by `COMMIT` / `ROLLBACK`).
    in_transaction: Cell<bool>,
    /// This replica's name in its ready announcements: its own listener ignores them (its
    /// long-polls were woken in process already).
    replica: Arc<str>,
}

type Pending = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// How long a statement may hold a runtime worker before the wait moves off it. A round trip is
/// well under a millisecond; waits longer than this (the write lock held by another replica, a
/// connection timing out in an outage) are the ones that would stall the worker's other tasks.
const WAIT_IN_PLACE: Duration = Duration::from_millis(2);

/// Wakes a thread parked in [`wait`].
struct Unpark(std::thread::Thread);

impl futures::task::ArcWake for Unpark {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.0.unpark();
    }
}

/// Waits for `fut` from synchronous code (the store's rules are synchronous; see the module doc).
///
/// On a multi-threaded runtime's worker it first waits in place for up to [`WAIT_IN_PLACE`], as
/// any short synchronous call (a SQLite statement) does; past that the rest of the wait goes
/// through `block_in_place`, so the worker's other tasks (HTTP requests, long-polls, the agent)
/// move to another thread instead of stalling behind the database. Why not `block_in_place`
/// for every statement: it hands the worker's scheduler to another thread each time a task
/// enters it, which cost more than the round trip itself in measurements here. Elsewhere (a
/// current-thread runtime, a plain thread) it blocks the calling thread.
fn wait<F: Future>(fut: F) -> F::Output {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if !multi_thread {
        return futures::executor::block_on(fut);
    }
    let mut fut = std::pin::pin!(fut);
    let waker = futures::task::waker(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let start = std::time::Instant::now();
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        let waited = start.elapsed();
        if waited >= WAIT_IN_PLACE {
            break;
        }
        // Woken by the answer (or spuriously: polled again).
        std::thread::park_timeout(WAIT_IN_PLACE - waited);
    }
    tokio::task::block_in_place(|| futures::executor::block_on(fut))
}

/// Where a connection's notifications go: the other replicas' ready announcements wake `woken`;
/// this replica's own (named `replica`) are ignored.
#[derive(Clone)]
struct Listener {
    woken: Arc<tokio::sync::Notify>,
    replica: Arc<str>,
}

/// Opens a connection on `rt`, waiting for it from any thread (even one inside a runtime).
/// `listener`: the connection's notifications are delivered there (see [`PgStore::try_lead`]).
fn connect(
    rt: &tokio::runtime::Handle,
    target: &PgTarget,
    replica: &Arc<str>,
    listener: Option<Listener>,
) -> Result<PgConn, DbError> {
    let config = target.config.clone();
    let tls = target.tls.clone();
    let handle = rt.spawn(async move {
        let client = match tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls).await?;
                tokio::spawn(drive(connection, listener));
                client
            }
            None => {
                let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(drive(connection, listener));
                client
            }
        };
        Ok::<_, tokio_postgres::Error>(client)
    });
    let client =
        wait(handle).map_err(|e| DbError::Unavailable(format!("the database connection task failed: {e}")))??;
    Ok(PgConn {
        client: Arc::new(client),
        statements: RefCell::new(HashMap::new()),
        pending: RefCell::new(Vec::new()),
        in_transaction: Cell::new(false),
        replica: Arc::clone(replica),
    })
}

/// Runs a connection until it ends, handing its notifications to `listener`.
async fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>, listener: Option<Listener>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if let Some(l) = &listener
                    && n.channel() == READY_CHANNEL
                    && n.payload() != &*l.replica
                {
                    l.woken.notify_waiters();
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %describe(&e), "the database connection ended; it is opened again on next use");
                return;
            }
        }
    }
}

impl PgConn {
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn statement(&self, sql: &str) -> Result<Statement, DbError> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let translated = translate(sql);
        // Behind the statements sent before it: their error, if any, comes first.
        let s = self.run(self.client.prepare(&translated))?;
        self.statements.borrow_mut().insert(sql.to_string(), s.clone());
        Ok(s)
    }

    /// Sends `fut`'s request now (one poll puts it on the connection) and keeps it; its answer is
    /// collected by the next [`PgConn::run`].
    fn send(&self, mut fut: Pending) -> Result<(), DbError> {
        let waker = futures::task::noop_waker();
        match fut.as_mut().poll(&mut Context::from_waker(&waker)) {
            // Refused before it left (e.g. the connection is closed).
            Poll::Ready(r) => Ok(r?),
            Poll::Pending => {
                self.pending.borrow_mut().push(fut);
                Ok(())
            }
        }
    }

    /// Runs `fut` behind the statements sent before it and waits for all of them: one round trip.
    /// An error of an earlier statement comes first (it aborted the transaction, so this one
    /// failed because of it).
    fn run<T>(&self, fut: impl Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, DbError> {
        let (earlier, this) = self.run_after(fut);
        earlier?;
        this
    }

    /// [`PgConn::run`], with the earlier statements' outcome apart.
    fn run_after<T>(
        &self,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> (Result<(), DbError>, Result<T, DbError>) {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        if pending.is_empty() {
            return (Ok(()), wait(fut).map_err(DbError::from));
        }
        let earlier = async move {
            for p in pending {
                p.await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        };
        let (earlier, this) = wait(futures::future::join(earlier, fut));
        (earlier.map_err(DbError::from), this.map_err(DbError::from))
    }
}

fn params(vals: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
    vals.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl Db for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn exec(&self, sql: &str, vals: &[Val]) -> Result<usize, DbError> {
        let stmt = self.statement(sql)?;
        let n = self.run(self.client.execute(&stmt, &params(vals)))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn exec_quiet(&self, sql: &str, vals: &[Val]) -> Result<(), DbError> {
        if !self.in_transaction.get() {
            return self.exec(sql, vals).map(|_| ());
        }
        let stmt = self.statement(sql)?;
        let client = Arc::clone(&self.client);
        let vals = vals.to_vec();
        self.send(Box::pin(async move {
            client.execute(&stmt, &params(&vals)).await.map(|_| ())
        }))
    }

    fn query(&self, sql: &str, vals: &[Val]) -> Result<Vec<DbRow>, DbError> {
        let stmt = self.statement(sql)?;
        let rows = self.run(self.client.query(&stmt, &params(vals)))?;
        rows.iter().map(row_vals).collect()
    }

    fn batch(&self, sql: &str) -> Result<(), DbError> {
        let head: String = sql
            .trim_start()
            .chars()
            .take(8)
            .collect::<String>()
            .to_ascii_uppercase();
        let ends = head.starts_with("COMMIT") || head.starts_with("ROLLBACK");
        let r = if head.starts_with("ROLLBACK") {
            // Whatever failed before is undone by this; it is not this statement's error.
            self.run_after(self.client.batch_execute(sql)).1
        } else {
            self.run(self.client.batch_execute(&translate(sql)))
        };
        if ends {
            self.in_transaction.set(false);
        } else if head.starts_with("BEGIN") && r.is_ok() {
            self.in_transaction.set(true);
        }
        r
    }

    /// Pipelined like the transaction's other writes: delivered by the server with the commit.
    fn announce_ready(&self) -> Result<(), DbError> {
        self.exec_quiet(
            &format!("SELECT pg_notify('{READY_CHANNEL}', ?1)"),
            &[Val::Text(self.replica.to_string())],
        )
    }

    /// Sent without waiting: the transaction's first statement travels behind it, and reports
    /// its error (a lost connection) if it had one.
    fn begin_write(&self) -> Result<(), DbError> {
        let client = Arc::clone(&self.client);
        self.send(Box::pin(async move {
            client
                .batch_execute(&format!("BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})"))
                .await
        }))?;
        self.in_transaction.set(true);
        Ok(())
    }
}

fn row_vals(row: &tokio_postgres::Row) -> Result<DbRow, DbError> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let t = col.type_();
        let v = if *t == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map(Val::Int)
        } else if *t == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?.map(|v| Val::Int(i64::from(v)))
        } else if *t == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)?.map(|v| Val::Int(i64::from(v)))
        } else if *t == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?.map(Val::Bool)
        } else {
            row.try_get::<_, Option<String>>(i)?.map(Val::Text)
        };
        out.push(v.unwrap_or(Val::Null));
    }
    Ok(DbRow(out))
}

/// SQLite's spelling to PostgreSQL's: `?N` parameters become `$N`, `instr(` becomes `strpos(`
/// (same arguments, same 1-based answer), `INSERT OR IGNORE` becomes `ON CONFLICT DO NOTHING`
/// (written that way in the store already). No statement in the store has a `?` in a literal.
pub fn translate(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out.replace("instr(", "strpos(")
}

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(i) if *ty == Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
            // SQLite keeps booleans as integers (a state copied from SQLite).
            Val::Int(i) if *ty == Type::BOOL => (*i != 0).to_sql(ty, out),
            Val::Int(i) => i.to_sql(ty, out),
            Val::Text(s) => s.as_str().to_sql(ty, out),
            Val::Bool(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Typed by the value; a mismatch is the server's error, named with the statement.
        true
    }

    to_sql_checked!();
}

/// A driver error in words: the server's message and SQLSTATE when it sent one.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL said: {} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                source = inner.source();
            }
            s
        }
    }
}

/// Connection trouble, a server shutting down, or a lost serialisation conflict: worth a retry.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P") || c == "40001" || c == "40P01" || c == "53300"
        }
        // No SQLSTATE: an I/O or timeout failure on the way to the server.
        None => e.as_db_error().is_none(),
    }
}

/// The PostgreSQL state: one connection (reopened when it drops) driven by a private runtime.
pub struct PgStore {
    rt: Option<tokio::runtime::Runtime>,
    target: Mutex<PgTarget>,
    conn: Mutex<Option<PgConn>>,
    /// The leader lock's own connection, and whether it holds the lock. It also listens on
    /// [`READY_CHANNEL`] for the other replicas' announcements.
    leader: Mutex<Option<(PgConn, bool)>>,
    /// This replica's name in its announcements (random, per store).
    replica: Arc<str>,
    /// Woken when another replica announced ready jobs.
    woken: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects (the first connection is made now, so a wrong URL or password stops start-up).
    ///
    /// # Errors
    /// `Io` when the private runtime cannot start; `Db` when the database cannot be reached.
    pub fn open(target: PgTarget) -> Result<PgStore, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("apono-postgres")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                context: "starting the database connection thread".into(),
                source,
            })?;
        let replica: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
        let conn = match connect(rt.handle(), &target, &replica, None) {
            Ok(conn) => conn,
            Err(e) => {
                // A plain drop blocks, which panics inside the caller's runtime.
                rt.shutdown_background();
                return Err(StoreError::Db {
                    context: format!("connecting to the database {}", target.display()),
                    source: e,
                });
            }
        };
        Ok(PgStore {
            rt: Some(rt),
            target: Mutex::new(target),
            conn: Mutex::new(Some(conn)),
            leader: Mutex::new(None),
            replica,
            woken: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// The target new connections go to.
    pub fn target(&self) -> PgTarget {
        self.target.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The target for a new connection: the URL file read again when there is one (a rotated
    /// password); the last good target when it cannot be read or parsed now (said in the log).
    fn fresh_target(&self) -> PgTarget {
        let mut target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = target.url_file.clone() {
            match read_url_file(&file).and_then(|url| PgTarget::parse(&url)) {
                Ok(mut fresh) => {
                    fresh.url_file = Some(file);
                    *target = fresh;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "APONO_DATABASE_URL_FILE cannot be used now; connecting with the URL read before")
                }
            }
        }
        target.clone()
    }

    /// The connection, opened again first when it dropped.
    ///
    /// # Errors
    /// `Db` (transient) when the database cannot be reached now.
    pub fn lock(&self) -> Result<MutexGuard<'_, Option<PgConn>>, StoreError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(PgConn::is_closed) {
            *guard = None;
            let Some(rt) = &self.rt else {
                return Err(StoreError::Db {
                    context: "using the database".into(),
                    source: DbError::Unavailable("the store is closed".into()),
                });
            };
            let target = self.fresh_target();
            let conn = connect(rt.handle(), &target, &self.replica, None).map_err(|e| StoreError::Db {
                context: format!("connecting to the database {}", target.display()),
                source: e,
            })?;
            tracing::info!(database = %target.display(), "connected to the database again");
            *guard = Some(conn);
        }
        Ok(guard)
    }
}

impl PgStore {
    /// Woken when another replica committed jobs that are ready now (its `NOTIFY` on
    /// [`READY_CHANNEL`]), while this replica's leader connection is up; between a lost
    /// connection and the next [`PgStore::try_lead`] (a tick) nothing wakes it, so callers keep
    /// their own timeouts.
    pub fn remote_ready(&self) -> &tokio::sync::Notify {
        &self.woken
    }

    /// Whether this replica holds the leader lock (taking it when it is free). Every replica
    /// keeps that connection open (it tries the lock each tick), so it also carries the
    /// `LISTEN` for the other replicas' ready announcements.
    pub fn try_lead(&self) -> bool {
        let mut leader = self.leader.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((conn, held)) = leader.as_ref() {
            if conn.is_closed() {
                if *held {
                    tracing::warn!("lost the leader connection: another replica may run the scheduler now");
                }
                *leader = None;
            } else if *held {
                return true;
            }
        }
        if leader.is_none() {
            let Some(rt) = &self.rt else { return false };
            let listener = Listener {
                woken: Arc::clone(&self.woken),
                replica: Arc::clone(&self.replica),
            };
            match connect(rt.handle(), &self.fresh_target(), &self.replica, Some(listener))
                .and_then(|conn| conn.batch(&format!("LISTEN {READY_CHANNEL}")).map(|()| conn))
            {
                Ok(conn) => {
                    // Jobs announced while it was down were missed: look once.
                    self.woken.notify_waiters();
                    *leader = Some((conn, false));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open the leader connection now");
                    return false;
                }
            }
        }
        let Some((conn, held)) = leader.as_mut() else {
            return false;
        };
        match conn.query(&format!("SELECT pg_try_advisory_lock({LEADER_LOCK_KEY})"), &[]) {
            Ok(rows) if rows.first().and_then(|r| r.get::<bool>(0).ok()) == Some(true) => {
                *held = true;
                tracing::info!("this replica runs the scheduler and reconcile now (leader lock taken)");
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::debug!(error = %e, "cannot try the leader lock now");
                *leader = None;
                false
            }
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Ok(mut guard) = self.leader.lock() {
            *guard = None;
        }
        // Dropping a runtime blocks; from inside another runtime that panics. Nothing of ours
        // runs on it but the connection, which may end abruptly (the server rolls back).
        if let Ok(mut guard) = self.conn.lock() {
            *guard = None;
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests;
