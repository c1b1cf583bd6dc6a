//! The operator token: the credential of the operator API (`/operator/v1`).
//!
//! The daemon (`run` standalone, `control-plane serve`) creates it at first start in
//! `<data_dir>/operator.token` (32 random bytes, hex, mode 0600) and keeps it across restarts; the
//! `access` commands read it from there, or from `APONO_OPERATOR_TOKEN`. Whoever can read the file
//! can grant access, so a file readable by others stops start-up instead of being used.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

/// Name of the token file inside `data_dir`.
pub const TOKEN_FILE: &str = "operator.token";

/// Environment variable that gives the `access` commands the token directly.
pub const TOKEN_ENV: &str = "APONO_OPERATOR_TOKEN";

/// Why the operator token cannot be had. Never carries the token itself.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A configuration the operator must fix (blank token, permissions too wide, no token found).
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// The token file of `data_dir`.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// A token that is empty or only whitespace is a configuration error naming `source` (a blank
/// token must never mean "authentication off").
///
/// # Errors
/// `Config` naming `source` when `value` is blank.
pub fn non_blank(source: &str, value: &str) -> Result<SecretString, TokenError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(TokenError::Config(format!(
            "{source} is empty or only whitespace: set a real token (a blank one never turns authentication off)"
        )));
    }
    Ok(SecretString::from(trimmed.to_string()))
}

/// Refuses a file that group or others may read or write, naming the path and the fix.
///
/// # Errors
/// `Config` when the mode is wider than 0600; `Io` when the file's metadata cannot be read.
pub fn check_private(path: &Path, what: &str) -> Result<(), TokenError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| TokenError::Io {
                context: format!("reading the permissions of {}", path.display()),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(TokenError::Config(format!(
                "{what} {} has permissions {:o}, wider than 0600: run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
    Ok(())
}

/// Reads the token file of `data_dir`: `None` when there is none.
///
/// # Errors
/// `Config` for a file with permissions wider than 0600 or a blank file; `Io` when it cannot be read.
pub fn read(data_dir: &Path) -> Result<Option<SecretString>, TokenError> {
    let path = token_path(data_dir);
    let text = match super::data_dir::read_private(&path) {
        Ok(Some(text)) => text,
        Ok(None) => return Ok(None),
        Err(source) => {
            return Err(TokenError::Io {
                context: format!("reading the operator token {}", path.display()),
                source,
            });
        }
    };
    check_private(&path, "the operator token file")?;
    non_blank(&format!("the operator token file {}", path.display()), &text).map(Some)
}

/// The daemon's token: the one in `data_dir` if there is one, else a new random one written there
/// with mode 0600. Call it with the data dir locked (after the store is open) so two daemons never
/// race to create it.
///
/// # Errors
/// As [`read`], or `Io` when the file cannot be created.
pub fn ensure(data_dir: &Path) -> Result<SecretString, TokenError> {
    if let Some(token) = read(data_dir)? {
        return Ok(token);
    }
    let path = token_path(data_dir);
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token = hex::encode(bytes);
    write_new_private(&path, &token).map_err(|source| TokenError::Io {
        context: format!(
            "creating the operator token {} (is the data dir writable?)",
            path.display()
        ),
        source,
    })?;
    tracing::info!(path = %path.display(), "created the operator token (the `access` commands read it from here)");
    Ok(SecretString::from(token))
}

/// Writes `path` with mode 0600, atomically (temporary file, then rename).
fn write_new_private(path: &Path, text: &str) -> std::io::Result<()> {
    super::data_dir::write_private(path, text)
}

/// The token for an `access` command: `APONO_OPERATOR_TOKEN` (from `env`) when set, else the token
/// file of `data_dir()` (called only when the variable is not set, as finding the data dir loads
/// the config).
///
/// # Errors
/// `Config` for a blank variable or file, a file readable by others, or no token at all.
pub fn for_client(
    env: impl Fn(&str) -> Option<String>,
    data_dir: impl FnOnce() -> Result<PathBuf, TokenError>,
) -> Result<SecretString, TokenError> {
    if let Some(value) = env(TOKEN_ENV) {
        return non_blank(TOKEN_ENV, &value);
    }
    let dir = data_dir()?;
    read(&dir)?.ok_or_else(|| {
        TokenError::Config(format!(
            "no operator token: {} does not exist. Run `apono-connector access` where the daemon's data dir is, \
             pass --config, or set {TOKEN_ENV}",
            token_path(&dir).display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn ensure_creates_a_private_random_token_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path()).unwrap();
        assert_eq!(first.expose_secret().len(), 64);
        assert!(first.expose_secret().bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(token_path(dir.path())).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = ensure(dir.path()).unwrap();
        assert_eq!(first.expose_secret(), again.expose_secret(), "kept across restarts");
        let other = tempfile::tempdir().unwrap();
        assert_ne!(ensure(other.path()).unwrap().expose_secret(), first.expose_secret());
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_readable_by_others_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let token = ensure(dir.path()).unwrap();
        let path = token_path(dir.path());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ensure(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("chmod 600"),
            "{e}"
        );
        assert!(!e.contains(token.expose_secret()));
    }

    #[test]
    fn blank_tokens_are_errors_naming_where_they_came_from() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(token_path(dir.path()), " \n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(token_path(dir.path()), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let e = ensure(dir.path()).unwrap_err().to_string();
        assert!(e.contains(TOKEN_FILE) && e.contains("empty"), "{e}");
        let e = for_client(|_| Some("  ".into()), || unreachable!())
            .unwrap_err()
            .to_string();
        assert!(e.contains(TOKEN_ENV), "{e}");
    }

    #[test]
    fn the_client_prefers_the_variable_then_the_file_then_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let from_env = for_client(|_| Some("tok-env".into()), || unreachable!()).unwrap();
        assert_eq!(from_env.expose_secret(), "tok-env");
        let e = for_client(|_| None, || Ok(dir.path().to_path_buf()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no operator token") && e.contains("--config") && e.contains(TOKEN_ENV),
            "{e}"
        );
        let created = ensure(dir.path()).unwrap();
        let read = for_client(|_| None, || Ok(dir.path().to_path_buf())).unwrap();
        assert_eq!(read.expose_secret(), created.expose_secret());
    }
}
