//! The data dir (`standalone.data_dir`, `APONO_DATA_DIR`): created 0700, checked to be this
//! process's (security review N4), writable, locked by one process, and its private files created
//! 0600 and opened without following symbolic links. The state store opens its database here;
//! the operator token lives here too.
//!
//! "This process's": owned by its uid (or by root, who can change it anyway), not writable by
//! other users, and writable by a group only when the process is in that group (the group it runs
//! as, or a supplementary group such as Kubernetes' `fsGroup`). Whoever else could write it could
//! plant a link that makes the daemon overwrite another file, or a token of their choosing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest token file read (a token is 64 characters): a link to `/dev/zero` or a huge planted
/// file is refused, not read without end.
pub const MAX_PRIVATE_FILE: u64 = 4096;

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
    use std::io::Seek;
    let path = dir.join(LOCK_FILE);
    let io = |context: &str| {
        let context = format!("{context} {}", path.display());
        move |source| DataDirError::Io { context, source }
    };
    let mut file = no_follow(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
    .open(&path)
    .map_err(|e| refused_link(&path, e))
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

/// Stops start-up when the data dir cannot be written, or is not this process's (see the module
/// doc), naming it and the fix, instead of failing later at the first write (or as an opaque
/// SQLite error). The owner's write bit is checked too, as root writes through missing
/// permission bits.
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
        check_owner(dir, &meta)?;
        if meta.permissions().mode() & 0o200 == 0 {
            return Err(fix(format!("mode {:o}", meta.permissions().mode() & 0o777)));
        }
    }
    // A fresh name, created (never opened through a link) and removed.
    let probe = dir.join(format!(
        ".write-check-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    no_follow(std::fs::OpenOptions::new().write(true).create_new(true))
        .open(&probe)
        .map_err(|e| fix(e.to_string()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Refuses a data dir another user could change: owned by another uid (root aside), writable by
/// everyone, or writable by a group this process is not in.
#[cfg(unix)]
fn check_owner(dir: &Path, meta: &std::fs::Metadata) -> Result<(), DataDirError> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let shown = dir.display();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(DataDirError::Unsafe(format!(
            "data_dir {shown} is owned by uid {}, not by this process's uid {me}: another user could replace its \
             files. Run `chown {me} {shown} && chmod 700 {shown}`, or set APONO_DATA_DIR to a directory of this user",
            meta.uid()
        )));
    }
    if mode & 0o002 != 0 {
        return Err(DataDirError::Unsafe(format!(
            "data_dir {shown} has mode {mode:o}: every user can write it, and could plant links or a token there. \
             Run `chmod 700 {shown}`"
        )));
    }
    if mode & 0o020 != 0 && !in_group(meta.gid()) {
        return Err(DataDirError::Unsafe(format!(
            "data_dir {shown} has mode {mode:o} and group {}, which this process is not in: that group's users could \
             plant links or a token there. Run `chmod 700 {shown}`",
            meta.gid()
        )));
    }
    Ok(())
}

/// This process runs as `gid`, or has it as a supplementary group.
#[cfg(unix)]
fn in_group(gid: u32) -> bool {
    rustix::process::getegid().as_raw() == gid
        || rustix::process::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

/// `options` with `O_NOFOLLOW`: a symbolic link at the name fails the open (`ELOOP`) instead of
/// being followed to whatever file it names.
fn no_follow(options: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    }
    options
}

/// `ELOOP` from an `O_NOFOLLOW` open, said plainly.
fn refused_link(path: &Path, e: std::io::Error) -> std::io::Error {
    #[cfg(unix)]
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        return std::io::Error::other(format!(
            "{} is a symbolic link, which the data dir never holds: remove it",
            path.display()
        ));
    }
    let _ = path;
    e
}

/// Reads a private file of the data dir (the operator token): `None` when there is none. Opened
/// without following links; it must be a regular file of this process's user (any, for root), at most
/// [`MAX_PRIVATE_FILE`] bytes.
///
/// # Errors
/// A link, another kind of file, another owner, a file too large, or an unreadable one.
pub fn read_private(path: &Path) -> std::io::Result<Option<String>> {
    let mut file = match no_follow(std::fs::OpenOptions::new().read(true)).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(refused_link(path, e)),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file: remove it",
            path.display()
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // Root (an operator's `sudo apono-connector access list`) may read the daemon user's file.
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me && me != 0 {
            return Err(std::io::Error::other(format!(
                "{} is owned by uid {}, not by this process's uid {me}: remove it (the daemon writes a new one)",
                path.display(),
                meta.uid()
            )));
        }
    }
    if meta.len() > MAX_PRIVATE_FILE {
        return Err(std::io::Error::other(format!(
            "{} is {} bytes, more than a token ever is: remove it",
            path.display(),
            meta.len()
        )));
    }
    let mut text = String::new();
    Read::by_ref(&mut file)
        .take(MAX_PRIVATE_FILE)
        .read_to_string(&mut text)?;
    Ok(Some(text))
}

/// Writes `text` to `path` atomically with mode 0600: a temporary file in the same directory,
/// created new (never through a link), synced, then renamed over `path` and the directory synced.
/// A reader sees no file or the whole file, never an empty one, and a crash leaves no half-written
/// token (security review N15).
///
/// # Errors
/// The temporary file cannot be created or written, or the rename fails.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = (|| {
        let mut file = no_follow(&mut options).open(&tmp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a power loss only once the directory is synced.
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
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
        // SQLite opens the path itself: it must not be a link to somewhere else.
        if let Ok(meta) = std::fs::symlink_metadata(path)
            && !meta.is_file()
        {
            return Err(DataDirError::Unsafe(format!(
                "the state database {} is not a regular file (a symbolic link?): remove it, or restore the real file",
                path.display()
            )));
        }
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
        no_follow(std::fs::OpenOptions::new().create(true).append(true).mode(0o600))
            .open(path)
            .map_err(|e| refused_link(path, e))
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

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;
    use crate::control_plane::operator_token;

    /// What a daemon does to its data dir at start: the store's steps, then the token.
    fn start(dir: &Path) -> Result<std::fs::File, String> {
        create_dir(dir).map_err(|e| e.to_string())?;
        check_writable(dir).map_err(|e| e.to_string())?;
        let lock = lock_data_dir(dir).map_err(|e| e.to_string())?;
        create_private_file(&dir.join("control-plane.sqlite3")).map_err(|e| e.to_string())?;
        operator_token::ensure(dir).map_err(|e| e.to_string())?;
        Ok(lock)
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Root only: giving a file away needs it. Elsewhere the test says why it did not run, and
    /// fails under CI (where it runs as root).
    fn root_or_skip(what: &str) -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} needs root (chown), and CI=true"
        );
        eprintln!("skipped: {what} needs root to chown");
        false
    }

    #[test]
    fn planted_links_are_refused_and_their_targets_untouched() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        for name in [LOCK_FILE, "control-plane.sqlite3", operator_token::TOKEN_FILE] {
            std::fs::write(&victim, "IMPORTANT CONTENT").unwrap();
            let dir = tempfile::tempdir().unwrap();
            chmod(dir.path(), 0o700);
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
            let e = start(dir.path()).expect_err(name);
            assert!(e.contains(name) && (e.contains("symbolic link")), "{name}: {e}");
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "IMPORTANT CONTENT", "{name}");
        }
        // A link to an endless file is not read without end either.
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o700);
        std::os::unix::fs::symlink("/dev/zero", dir.path().join(operator_token::TOKEN_FILE)).unwrap();
        assert!(start(dir.path()).is_err());
    }

    #[test]
    fn a_data_dir_every_user_can_write_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o1777, 0o702] {
            chmod(dir.path(), mode);
            let e = start(dir.path()).unwrap_err();
            assert!(
                e.contains("every user can write") && e.contains("chmod 700"),
                "{mode:o}: {e}"
            );
        }
        chmod(dir.path(), 0o700);
        start(dir.path()).expect("a private dir is accepted");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".write-check")),
            "the probe is removed"
        );
    }

    #[test]
    fn a_data_dir_writable_by_a_group_of_strangers_is_refused() {
        if !root_or_skip("a group-writable data dir") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // nogroup: not a group root runs as.
        std::os::unix::fs::chown(dir.path(), None, Some(65534)).unwrap();
        chmod(dir.path(), 0o770);
        let e = start(dir.path()).unwrap_err();
        assert!(e.contains("group 65534") && e.contains("chmod 700"), "{e}");
        // The process's own group (Kubernetes' fsGroup) may write it.
        std::os::unix::fs::chown(dir.path(), None, Some(rustix::process::getegid().as_raw())).unwrap();
        start(dir.path()).expect("our own group");
    }

    #[test]
    fn a_data_dir_owned_by_another_user_is_refused() {
        if !root_or_skip("a data dir owned by another uid") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o700);
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let e = start(dir.path()).unwrap_err();
        assert!(e.contains("owned by uid 65534") && e.contains("chown"), "{e}");
        std::os::unix::fs::chown(dir.path(), Some(0), None).unwrap();
        start(dir.path()).expect("root's");
    }

    #[test]
    fn the_token_is_written_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.token");
        write_private(&path, "abc").unwrap();
        assert_eq!(read_private(&path).unwrap().as_deref(), Some("abc"));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["operator.token"], "no temporary file left");
        std::fs::write(&path, vec![b'a'; 10_000]).unwrap();
        assert!(read_private(&path).unwrap_err().to_string().contains("remove it"));
    }
}
