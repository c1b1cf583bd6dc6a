//! The data dir (`standalone.data_dir`, `APONO_DATA_DIR`): created 0700, checked writable, locked
//! by one process, and its private files created 0600. The state store opens its database here;
//! the operator token lives here too.

use std::path::Path;

/// Name of the lock file inside `data_dir` (holds the owner's pid, for the error message).
pub const LOCK_FILE: &str = "lock";

/// Why the data dir cannot be used: the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another instance in this one) holds the data directory's lock.
    #[error("{0}")]
    InUse(String),
    /// The data dir is not writable, not the agent's, or a state file is readable by others.
    #[error("{0}")]
    Unsafe(String),
}

/// Takes the exclusive lock on `data_dir/lock` and writes this process's pid into it.
///
/// # Errors
/// `InUse` when another holder has it (another process, or another open in this one), naming its
/// pid; `Io` when the file cannot be created or locked.
pub fn lock_data_dir(dir: &Path) -> Result<std::fs::File, DataDirError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let io = |context: &str| {
        let context = format!("{context} {}", path.display());
        move |source| DataDirError::Io { context, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("creating the lock file"))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = text.trim();
            let pid = if pid.is_empty() { "unknown" } else { pid };
            return Err(DataDirError::InUse(format!(
                "data_dir {} is in use by another apono-connector process (pid {pid}): stop it, or give this one its own data_dir",
                dir.display()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io("locking")(e)),
    }
    file.set_len(0).map_err(io("writing the pid into"))?;
    file.rewind().map_err(io("writing the pid into"))?;
    write!(file, "{}", std::process::id()).map_err(io("writing the pid into"))?;
    Ok(file)
}

pub fn create_dir(dir: &Path) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        context: format!("creating the data directory {}", dir.display()),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io)?;
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(io)?;
    Ok(())
}

/// Stops start-up when the data dir cannot be written, naming it and the fix, instead of failing
/// later at the first write (or as an opaque SQLite error). The owner's write bit is checked too,
/// as root writes through missing permission bits.
pub fn check_writable(dir: &Path) -> Result<(), DataDirError> {
    let fix = |why: String| {
        DataDirError::Unsafe(format!(
            "data_dir {} is not writable ({why}): make it writable by the user running apono-connector \
             (e.g. `chown $(id -u) {0} && chmod 700 {0}`), or set APONO_DATA_DIR to a writable directory",
            dir.display()
        ))
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir).map_err(|e| fix(e.to_string()))?;
        if !meta.is_dir() {
            return Err(fix("it is not a directory".into()));
        }
        if meta.permissions().mode() & 0o200 == 0 {
            return Err(fix(format!("mode {:o}", meta.permissions().mode() & 0o777)));
        }
    }
    let probe = dir.join(".write-check");
    std::fs::write(&probe, b"").map_err(|e| fix(e.to_string()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Creates the file with mode 0600 before SQLite opens it: it may hold inline credentials. SQLite
/// gives its `-wal` and `-shm` files the same mode. An existing file readable by others stops
/// start-up: its secrets may already have been read, which the operator must know.
pub fn create_private_file(path: &Path) -> Result<(), DataDirError> {
    let io = |source| DataDirError::Io {
        context: format!("creating {}", path.display()),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            return Err(DataDirError::Unsafe(format!(
                "the state database {} has permissions {:o}, wider than 0600 (it may hold credentials): \
                 run `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
    }
    #[cfg(not(unix))]
    {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
    }
    Ok(())
}
