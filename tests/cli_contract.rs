//! The command line's promises to scripts, probes and people (README "Command line"): exit codes,
//! `healthcheck`, help that names the environment, completions, the man page, the config file
//! from `APONO_CONFIG`, logs without escape codes, and a closed stdout. Real processes of the binary.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{BIN, ChildGuard, free_port, wait_for_port};

/// Runs the binary with `envs` (and nothing from this process that could change the outcome).
fn cli(args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("APONO_CONFIG")
        .env_remove("APONO_HEALTH_ADDR")
        .env_remove("APONO_OPERATOR_TOKEN")
        .env_remove("NO_COLOR")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run apono-connector")
}

async fn cli_async(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let envs: Vec<(String, String)> = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        cli(&args, &envs)
    })
    .await
    .expect("cli task")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A standalone config in `dir`: operator API on `listen_port`, state in `dir/state`, health
/// server on `health_port`; returns the file's path.
fn standalone_config(dir: &Path, listen_port: u16, health_port: u16) -> String {
    let path = dir.join("connector.toml");
    std::fs::write(
        &path,
        format!(
            "[standalone]\nlisten = \"127.0.0.1:{listen_port}\"\ndata_dir = \"{}\"\n\n\
             [telemetry]\nhealth_addr = \"127.0.0.1:{health_port}\"\n",
            dir.join("state").display()
        ),
    )
    .expect("write the config");
    path.to_string_lossy().into_owned()
}

/// Polls `healthcheck` (with `envs`) until it exits `want`; returns that run.
async fn healthcheck_until(want: i32, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = vec!["healthcheck"];
        all.extend_from_slice(args);
        let out = cli_async(&all, envs).await;
        if out.status.code() == Some(want) {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "healthcheck {args:?} never exited {want}; last: {:?} {} {}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exit_codes_and_the_refusals_that_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, health) = (free_port(), free_port());
    let config = standalone_config(dir.path(), listen, health);
    let _daemon = ChildGuard::spawn(&["run", "--config", &config], &[], dir.path());
    wait_for_port(listen).await;

    // Ready: 0, one line on stdout. The address comes from APONO_HEALTH_ADDR, and one that binds
    // every interface is asked on loopback.
    let health_addr = format!("0.0.0.0:{health}");
    let out = healthcheck_until(0, &[], &[("APONO_HEALTH_ADDR", &health_addr)]).await;
    let line = stdout(&out);
    assert!(
        line.trim().lines().count() == 1 && line.contains(&format!("http://127.0.0.1:{health}/readyz")),
        "{line}"
    );
    // ... or from the config file that APONO_CONFIG names, /healthz with --live.
    let out = cli_async(&["healthcheck", "--live"], &[("APONO_CONFIG", &config)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("/healthz"), "{}", stdout(&out));
    // ... or the URL given.
    let url = format!("http://127.0.0.1:{health}/readyz");
    let out = cli_async(&["healthcheck", "--url", &url], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // The operator API refusing the token: 3, and the line says which token.
    let cp = format!("http://127.0.0.1:{listen}");
    let out = cli_async(
        &["access", "list", "--control-plane", &cp],
        &[("APONO_OPERATOR_TOKEN", "not-the-operator-token")],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("refused the operator token") && !stderr(&out).contains("not-the-operator-token"),
        "{}",
        stderr(&out)
    );
    // The right token (from the data dir APONO_CONFIG names) is accepted: the 3 above was the token.
    let out = cli_async(
        &["access", "list", "--control-plane", &cp],
        &[("APONO_CONFIG", &config)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A second `run` on the locked data dir: 3.
    let other_listen = format!("127.0.0.1:{}", free_port());
    let other_health = format!("127.0.0.1:{}", free_port());
    let out = cli_async(
        &["run", "--config", &config],
        &[
            ("APONO_LISTEN_ADDR", &other_listen),
            ("APONO_HEALTH_ADDR", &other_health),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));

    // Nothing listening: 3, saying the connection was refused.
    let closed = format!("http://127.0.0.1:{}/readyz", free_port());
    let out = cli_async(&["healthcheck", "--url", &closed], &[]).await;
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("refused the connection"), "{}", stderr(&out));

    // A bad URL is a usage error (2), not "not ready".
    let out = cli_async(&["healthcheck", "--url", "not a url"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_of_a_daemon_that_is_not_ready_exits_3_with_the_reason() {
    // Remote mode with a control plane that is not there: the health server answers 503.
    let dir = tempfile::tempdir().unwrap();
    let health = free_port();
    let health_addr = format!("127.0.0.1:{health}");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let _daemon = ChildGuard::spawn(
        &["run"],
        &[
            ("APONO_URL", &nowhere),
            ("APONO_TOKEN", "t"),
            ("APONO_HEALTH_ADDR", &health_addr),
        ],
        dir.path(),
    );
    wait_for_port(health).await;
    let out = cli_async(&["healthcheck"], &[("APONO_HEALTH_ADDR", &health_addr)]).await;
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let line = stderr(&out);
    assert!(line.contains("503") && line.trim().lines().count() == 1, "{line}");
    // The process lives, though.
    let out = cli_async(&["healthcheck", "--live"], &[("APONO_HEALTH_ADDR", &health_addr)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn healthcheck_gives_up_after_its_timeout() {
    // A listener that accepts and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let out = cli(&["healthcheck", "--url", &url, "--timeout-seconds", "1"], &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("did not answer within 1 s"), "{}", stderr(&out));
}

#[test]
fn check_exits_3_when_a_check_fails_and_reads_the_config_that_apono_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = standalone_config(dir.path(), free_port(), free_port());
    // No integrations configured: a FAILED row, exit 3; the file came from APONO_CONFIG.
    let out = cli(&["check"], &[("APONO_CONFIG", &config)]);
    assert_eq!(out.status.code(), Some(3), "{}{}", stdout(&out), stderr(&out));
    let table = stdout(&out);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("config") && l.contains(&config)),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("FAILED") && l.contains("integrations")),
        "{table}"
    );

    // A file APONO_CONFIG names must exist.
    let missing = dir.path().join("missing.toml");
    let out = cli(&["check"], &[("APONO_CONFIG", &missing.to_string_lossy())]);
    assert!(stdout(&out).contains("does not exist"), "{}", stdout(&out));
}

#[test]
fn help_names_the_environment_and_the_exit_codes() {
    let out = cli(&["run", "--help"], &[]);
    let help = stdout(&out);
    assert!(help.contains("[env: APONO_CONFIG="), "{help}");
    assert!(help.contains("/etc/apono-connector/connector.toml"), "{help}");
    // Every variable the config reads (src/config.rs ENV_KEYS) is listed.
    for name in env_keys() {
        assert!(help.contains(&name), "`run --help` does not list {name}:\n{help}");
    }
    let help = stdout(&cli(&["access", "list", "--help"], &[]));
    assert!(help.contains("[env: APONO_CONTROL_PLANE="), "{help}");
    let help = stdout(&cli(&["--help"], &[]));
    for code in ["0  success", "1  failure", "2  usage", "3  not ready or refused"] {
        assert!(help.contains(code), "{code:?} missing:\n{help}");
    }
    // A usage error is 2.
    assert_eq!(cli(&["run", "--no-such-flag"], &[]).status.code(), Some(2));
}

/// The variable names of `ENV_KEYS` in src/config.rs.
fn env_keys() -> Vec<String> {
    let source = include_str!("../src/config.rs");
    let start = source.find("const ENV_KEYS").expect("ENV_KEYS in src/config.rs");
    let table = &source[start..];
    let table = &table[..table.find("];").expect("end of ENV_KEYS")];
    let names: Vec<String> = table
        .split("(\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(str::to_string)
        .collect();
    assert!(names.len() > 10, "ENV_KEYS parsed: {names:?}");
    names
}

#[test]
fn completions_and_the_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(&["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        for sub in ["run", "healthcheck", "control-plane", "access"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let out = cli(&["man"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = stdout(&out);
    assert!(page.contains(".TH apono-connector 1"), "{page}");
    assert!(page.contains("healthcheck"), "{page}");

    let dir = tempfile::tempdir().unwrap();
    let out = cli(&["man", "--out-dir", &dir.path().to_string_lossy()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for page in [
        "apono-connector.1",
        "apono-connector-healthcheck.1",
        "apono-connector-access-list.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
}

#[test]
fn logs_carry_no_escape_codes_when_stderr_is_not_a_terminal() {
    // A bad APONO_LOG_LEVEL makes even a one-shot command log a warning.
    for no_color in [None, Some("1")] {
        let mut envs = vec![("APONO_LOG_LEVEL", "[[not a filter")];
        if let Some(v) = no_color {
            envs.push(("NO_COLOR", v));
        }
        let out = cli(&["check"], &envs);
        let logs = stderr(&out);
        assert!(logs.contains("APONO_LOG_LEVEL does not parse"), "{logs}");
        assert!(
            !logs.contains('\u{1b}'),
            "escape codes in a pipe (NO_COLOR {no_color:?}): {logs:?}"
        );
    }
}

#[test]
fn a_closed_stdout_ends_a_printing_command_quietly() {
    let store = r#"{"type":"APONO","credentials":{"access_key":"a","secret_key":"s"}}"#;
    for args in [
        vec!["secret", "get", "--store", store],
        vec!["completions", "bash"],
        vec!["man"],
        vec!["check"],
    ] {
        // The reading end is closed before the child writes: its first write fails with EPIPE.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let out = Command::new(BIN)
            .args(&args)
            .env_remove("APONO_CONFIG")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run apono-connector");
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(out.status.code(), Some(101), "{args:?}: {err}");
        if args[0] != "check" {
            assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        }
    }
}

#[test]
fn the_default_config_file_is_read_when_it_exists_and_none_is_named() {
    use apono_connector::config::{Config, DEFAULT_CONFIG_FILE};
    assert_eq!(DEFAULT_CONFIG_FILE, "/etc/apono-connector/connector.toml");
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("connector.toml");
    assert_eq!(
        Config::file_to_read(None, &default),
        None,
        "a missing default is no error"
    );
    std::fs::write(&default, "").unwrap();
    assert_eq!(Config::file_to_read(None, &default), Some(default.clone()));
    let named = dir.path().join("named.toml");
    assert_eq!(
        Config::file_to_read(Some(&named), &default),
        Some(named),
        "a named file wins (and must exist)"
    );
}
