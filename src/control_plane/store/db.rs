//! The one thing the store's queries need from a database: run a statement with positional
//! parameters, read rows of plain values, and open, commit or roll back a transaction. SQLite
//! (rusqlite) and PostgreSQL (`postgres`, feature `store-postgres`) both answer it, so every
//! query in `store` is written once, in SQLite's spelling (`?1`, `instr`), and the PostgreSQL
//! connection translates the two spellings that differ.
//!
//! Why values and not each driver's types: the rows here are text, 64-bit integers and booleans
//! only, and one code path for both backends is what makes "same rules on both" true by
//! construction rather than by two copies kept in step.

use std::fmt;

/// A parameter or a column value.
#[derive(Clone, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Text(String),
    Bool(bool),
}

// Values may hold inline credentials (an integration's spec): never printed.
impl fmt::Debug for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Null => f.write_str("Null"),
            Val::Int(_) => f.write_str("Int(..)"),
            Val::Text(_) => f.write_str("Text(..)"),
            Val::Bool(_) => f.write_str("Bool(..)"),
        }
    }
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::Bool(v)
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(v.to_string())
    }
}
/// `p!` borrows its arguments, as rusqlite's `params!` does.
impl<T: Clone + Into<Val>> From<&T> for Val {
    fn from(v: &T) -> Self {
        v.clone().into()
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// Builds a parameter list: `p![a, b]` is `[Val::from(a), Val::from(b)]`.
macro_rules! p {
    ($($v:expr),* $(,)?) => { [$($crate::control_plane::store::db::Val::from(&$v)),*] };
}
pub(crate) use p;

/// One row: values in column order.
#[derive(Debug)]
pub struct DbRow(pub Vec<Val>);

impl DbRow {
    /// Column `i` as `T`; an error message (for `StoreError::Corrupt`) when it is not one.
    pub fn get<T: FromVal>(&self, i: usize) -> Result<T, String> {
        let v = self.0.get(i).unwrap_or(&Val::Null);
        T::from_val(v).ok_or_else(|| unexpected(i))
    }

    /// Column `i` as `T`, moved out of the row (it reads as NULL afterwards): its text is not
    /// copied. For decoding whole rows, where every column is read once.
    pub fn take<T: FromVal>(&mut self, i: usize) -> Result<T, String> {
        let v = self.0.get_mut(i).map_or(Val::Null, |v| std::mem::replace(v, Val::Null));
        T::from_owned(v).ok_or_else(|| unexpected(i))
    }
}

fn unexpected(i: usize) -> String {
    format!("column {i} has an unexpected type or is null")
}

/// A Rust type a column decodes to.
pub trait FromVal: Sized {
    fn from_val(v: &Val) -> Option<Self>;
    /// The same, from a value the caller gives up.
    fn from_owned(v: Val) -> Option<Self> {
        Self::from_val(&v)
    }
}
impl FromVal for i64 {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }
}
impl FromVal for bool {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Bool(b) => Some(*b),
            // SQLite keeps booleans as integers.
            Val::Int(i) => Some(*i != 0),
            _ => None,
        }
    }
}
impl FromVal for String {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
    fn from_owned(v: Val) -> Option<Self> {
        match v {
            Val::Text(s) => Some(s),
            _ => None,
        }
    }
}
impl<T: FromVal> FromVal for Option<T> {
    fn from_val(v: &Val) -> Option<Self> {
        match v {
            Val::Null => Some(None),
            v => T::from_val(v).map(Some),
        }
    }
    fn from_owned(v: Val) -> Option<Self> {
        match v {
            Val::Null => Some(None),
            v => T::from_owned(v).map(Some),
        }
    }
}

/// A driver's error, kept whole for `source()`.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[cfg(feature = "store-postgres")]
    #[error("{}", super::postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The connection to the database is down (and could not be made again just now).
    #[error("{0}")]
    Unavailable(String),
}

impl DbError {
    /// Whether trying again later can succeed (the database was unreachable or the transaction
    /// lost a conflict), as opposed to a statement or row that is wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                )
            }
            DbError::Sqlite(_) => false,
            #[cfg(feature = "store-postgres")]
            DbError::Postgres(e) => super::postgres::is_transient(e),
            DbError::Unavailable(_) => true,
        }
    }
}

/// Which SQL spelling a connection speaks (for the few statements that differ, e.g. migrations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    #[cfg_attr(not(feature = "store-postgres"), allow(dead_code))]
    Postgres,
}

/// A connection the store's queries run on (inside a transaction or not).
pub trait Db {
    fn dialect(&self) -> Dialect;
    /// Runs one statement; returns the number of rows it changed.
    fn exec(&self, sql: &str, params: &[Val]) -> Result<usize, DbError>;
    /// Runs one statement whose row count nobody reads. PostgreSQL, inside a transaction, sends
    /// it without waiting (pipelined): its error comes from the next statement or the commit.
    fn exec_quiet(&self, sql: &str, params: &[Val]) -> Result<(), DbError> {
        self.exec(sql, params).map(|_| ())
    }
    /// Runs one query; returns its rows.
    fn query(&self, sql: &str, params: &[Val]) -> Result<Vec<DbRow>, DbError>;
    /// Runs statements without parameters, separated by `;`.
    fn batch(&self, sql: &str) -> Result<(), DbError>;
    /// Inside a write transaction: tells the other processes sharing the database, at commit,
    /// that jobs became ready (PostgreSQL `NOTIFY`; see `postgres::READY_CHANNEL`). SQLite: one
    /// process, nothing to tell.
    fn announce_ready(&self) -> Result<(), DbError> {
        Ok(())
    }
    /// Starts a write transaction that excludes every other writer (SQLite `BEGIN IMMEDIATE`;
    /// PostgreSQL `BEGIN` plus a transaction advisory lock, see `postgres`).
    fn begin_write(&self) -> Result<(), DbError>;
}

/// The first row, if any.
pub fn query_opt(c: &dyn Db, sql: &str, params: &[Val]) -> Result<Option<DbRow>, DbError> {
    Ok(c.query(sql, params)?.into_iter().next())
}

// ----- SQLite -----

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        Ok(match self {
            Val::Null => ToSqlOutput::Owned(Value::Null),
            Val::Int(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            Val::Bool(b) => ToSqlOutput::Owned(Value::Integer(i64::from(*b))),
            Val::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

fn sqlite_val(v: rusqlite::types::ValueRef<'_>) -> Val {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Val::Null,
        ValueRef::Integer(i) => Val::Int(i),
        // Not written by this store; kept readable rather than failing the row.
        ValueRef::Real(f) => Val::Text(f.to_string()),
        ValueRef::Text(t) | ValueRef::Blob(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
    }
}

impl Db for rusqlite::Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn exec(&self, sql: &str, params: &[Val]) -> Result<usize, DbError> {
        let mut stmt = self.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))?)
    }

    fn query(&self, sql: &str, params: &[Val]) -> Result<Vec<DbRow>, DbError> {
        let mut stmt = self.prepare_cached(sql)?;
        let n = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut vals = Vec::with_capacity(n);
            for i in 0..n {
                vals.push(sqlite_val(row.get_ref(i)?));
            }
            out.push(DbRow(vals));
        }
        Ok(out)
    }

    fn batch(&self, sql: &str) -> Result<(), DbError> {
        if sql.contains(';') {
            return Ok(self.execute_batch(sql)?);
        }
        // One statement: `COMMIT` and `ROLLBACK`, run at the end of every write, are cached
        // like the others rather than parsed again each time.
        self.prepare_cached(sql)?.raw_execute()?;
        Ok(())
    }

    fn begin_write(&self) -> Result<(), DbError> {
        self.batch("BEGIN IMMEDIATE")
    }
}
