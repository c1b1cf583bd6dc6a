//! The binary's own output carries no secret from a broken config file, and a value from outside
//! cannot forge its log lines or drive a terminal (security review N9a, N10).

mod common;

use std::time::{Duration, Instant};

use apono_connector::control_plane::operator::IntegrationRef;
use common::daemon::{Daemon, DaemonOptions, integration_toml, sim};
use common::run_cli;

/// A TOML syntax error right next to a secret: `check` and `run` say where, never the line.
#[test]
fn a_toml_error_next_to_a_secret_never_prints_it() {
    const CANARY: &str = "TOMLCANARY-s3cr3t-77";
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "[[integrations]]\ntype = \"rancher\"\nname = \"p\"\nconfig = {{ host = \"r.example.com\" }}\n\
             secret_store = {{ type = \"APONO\", credentials = {{ access_key = \"token-sim01\", secret_key = \"{CANARY}\" }} x\n"
        ),
    )
    .expect("write the config");
    let config = path.to_string_lossy();
    for args in [["check", "--config", &config], ["run", "--config", &config]] {
        let out = run_cli(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(!text.contains(CANARY) && !text.contains("s3cr3t"), "{args:?}: {text}");
        assert!(text.contains("line 5"), "{args:?} says where: {text}");
    }
}

/// A username with a newline and terminal escape sequences: the daemon's log (text, as outside
/// Docker) has no line it did not write and no raw escape sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newline_in_a_username_cannot_forge_a_log_line() {
    let sim = sim().await;
    let d = Daemon::start_opts(
        integration_toml("prod", &sim),
        DaemonOptions {
            log_to_file: true,
            ..DaemonOptions::default()
        },
    )
    .await;
    let forged = "eve\n2026-12-07T00:00:00.000000Z  INFO access revoked access=ar-FORGED\x1b[2J\x1b]0;pwned\x07";
    // The operator API may refuse such a name outright; either way nothing is forged.
    let accepted = d
        .request_with(
            IntegrationRef::Name("prod".into()),
            forged,
            "cluster-member",
            "c-7x2k9",
            600,
            false,
        )
        .await
        .is_ok();
    let deadline = Instant::now() + Duration::from_secs(15);
    let log = loop {
        let log = std::fs::read_to_string(d.log_path()).unwrap_or_default();
        if !accepted || log.contains("ar-FORGED") || Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if accepted {
        assert!(log.contains("ar-FORGED"), "the name was never logged:\n{log}");
    }
    assert!(
        !log.lines().any(|l| l.starts_with("2026-12-07T00:00:00")),
        "a forged line:\n{log}"
    );
    for raw in ["\x1b[2J", "\x1b]0", "\x07"] {
        assert!(!log.contains(raw), "{raw:?} reached the log raw:\n{log}");
    }
}
