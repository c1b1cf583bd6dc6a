//! What the commands print and how they exit (README "Command line"): results on stdout that end
//! quietly when the reader goes away, one-line notices on stderr, and the exit codes.

use std::io::{self, Write};

use crate::control_plane::{ControlPlaneError, operator_token};

/// Exit code of "not ready or refused" (README "Command line"): distinct from 1 (failed) so a
/// probe or a script can tell "try again later / fix the token" from "broken".
pub const EXIT_NOT_READY: u8 = 3;

/// A failure that exits [`EXIT_NOT_READY`]: not ready, or refused. The message is the whole line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The process exit code for a failed command: [`EXIT_NOT_READY`] for [`Refused`], for the operator
/// API refusing the token and for a data dir locked by another process; 1 otherwise. (Clap exits
/// 2 on usage errors before a command runs.)
pub fn exit_code(error: &anyhow::Error) -> u8 {
    let not_ready = error.chain().any(|cause| {
        cause.is::<Refused>()
            || matches!(
                cause.downcast_ref::<ControlPlaneError>(),
                Some(ControlPlaneError::Unauthorized { .. } | ControlPlaneError::InUse { .. })
            )
    });
    if not_ready { EXIT_NOT_READY } else { 1 }
}

/// The `access` commands' errors: a refused operator token says which token is meant (not the
/// agent's `APONO_TOKEN`, which the generic message names) and exits [`EXIT_NOT_READY`].
pub fn operator_refusal(error: anyhow::Error, control_plane: &str) -> anyhow::Error {
    let refused = error
        .chain()
        .find_map(|cause| match cause.downcast_ref::<ControlPlaneError>() {
            Some(ControlPlaneError::Unauthorized { message }) => Some(message.clone()),
            _ => None,
        });
    match refused {
        Some(message) => Refused(format!(
            "error: the operator API at {control_plane} refused the operator token ({message}): use the token of \
             the daemon behind that address: pass its --config (its data dir holds operator.token), run where \
             APONO_DATA_DIR points to it, or set {}",
            operator_token::TOKEN_ENV
        ))
        .into(),
        None => error,
    }
}

/// Stdout for results. When the reader goes away (`... | head -1`) the rest of the output is
/// dropped and the command ends normally: `println!` would panic on the closed pipe, and an error
/// about a pipe the user closed on purpose is noise.
#[derive(Default)]
pub struct Stdout {
    closed: bool,
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.closed {
            match io::stdout().write_all(buf) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.closed = true,
                other => other?,
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.closed {
            match io::stdout().flush() {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.closed = true,
                other => other?,
            }
        }
        Ok(())
    }
}

/// One line of a result on stdout (see [`Stdout`]).
///
/// # Errors
/// Stdout fails other than by a closed pipe (a full disk).
pub fn print_line(line: &str) -> io::Result<()> {
    let mut out = Stdout::default();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Bytes on stdout as they are (a script, a man page, a table; see [`Stdout`]).
///
/// # Errors
/// Stdout fails other than by a closed pipe.
pub fn print_bytes(bytes: &[u8]) -> io::Result<()> {
    let mut out = Stdout::default();
    out.write_all(bytes)?;
    out.flush()
}

/// A line on stderr (progress, notices); a closed stderr loses it instead of panicking.
pub(super) fn say(line: &str) {
    let _ = writeln!(io::stderr(), "{line}");
}
