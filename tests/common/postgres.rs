//! A real PostgreSQL server for tests: `initdb` and `pg_ctl` in a temporary directory, as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root), on a free loopback port,
//! stopped by its own data directory when dropped. Shared by the library's tests
//! (`control_plane::store::testing`) and the process tests in `tests/`.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use secrecy::SecretString;

/// A PostgreSQL server in a temporary directory, stopped when dropped.
pub struct PgServer {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    /// More `-c` settings for `postgres` (e.g. TLS).
    extra: String,
    created: Mutex<HashSet<String>>,
}

/// The newest PostgreSQL's `bin` directory (`APONO_TEST_PG_BIN` first).
fn pg_bin() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("APONO_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| "no /usr/lib/postgresql (apt-get install postgresql, or set APONO_TEST_PG_BIN)".to_string())?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no PostgreSQL server binaries under /usr/lib/postgresql".to_string())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

impl PgServer {
    /// initdb + pg_ctl start on a free loopback port; ready when this returns.
    ///
    /// # Errors
    /// What failed, with PostgreSQL's own output.
    pub fn start() -> Result<PgServer, String> {
        PgServer::start_with(&[], "")
    }

    /// Like [`PgServer::start`], with `files` (name, content) written into the server's directory
    /// (mode 0600, owned by the server's user: e.g. a TLS key) and `extra` settings, where
    /// `{dir}` stands for that directory.
    ///
    /// # Errors
    /// What failed, with PostgreSQL's own output.
    pub fn start_with(files: &[(&str, String)], extra: &str) -> Result<PgServer, String> {
        let bin = pg_bin()?;
        let as_postgres = is_root();
        let root = std::env::temp_dir().join(format!(
            "apono-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777));
        }
        let server = PgServer {
            root,
            bin,
            port: free_port()?,
            as_postgres,
            created: Mutex::new(HashSet::new()),
            extra: String::new(),
        };
        let mut server = server;
        server.extra = extra.replace("{dir}", &server.root.display().to_string());
        for (name, content) in files {
            let path = server.root.join(name);
            write_private(&path, content)?;
            if server.as_postgres {
                let _ = Command::new("chown").arg("postgres").arg(&path).status();
            }
        }
        let data = server.data_dir();
        server.run(
            "initdb",
            &["-D", &data, "-U", "apono", "--auth=trust", "-E", "UTF8", "--no-sync"],
        )?;
        server.start_again()?;
        Ok(server)
    }

    /// The server's processes now: the postmaster (from its pid file) and its children (the
    /// backends, one per connection, and the background workers).
    pub fn pids(&self) -> Vec<u32> {
        let pid_file = self.root.join("data").join("postmaster.pid");
        let Some(main) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return Vec::new();
        };
        let mut out = vec![main];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // Field 4 (ppid) follows the command name, which may hold spaces.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(main) {
                out.push(pid);
            }
        }
        out
    }

    fn data_dir(&self) -> String {
        self.root.join("data").display().to_string()
    }

    /// Starts the (stopped) server again on the same port and data.
    ///
    /// # Errors
    /// pg_ctl failed.
    pub fn start_again(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=400 {}",
            self.port,
            self.root.display(),
            self.extra
        );
        let log = self.root.join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-w",
                "-t",
                "30",
                "-o",
                &opts,
                "start",
            ],
        )
    }

    /// Stops the server at once (`immediate`: as a crash would).
    ///
    /// # Errors
    /// pg_ctl failed.
    pub fn stop(&self) -> Result<(), String> {
        self.run("pg_ctl", &["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"])
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(&self.root)
            .output()
            .map_err(|e| format!("running {tool}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// The URL of database `name`, created on first use (empty).
    pub fn database(&self, name: &str) -> SecretString {
        let mut created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        if created.insert(name.to_string()) {
            let port = self.port.to_string();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let out = Command::new(self.bin.join("createdb"))
                    .args(["-h", "127.0.0.1", "-p", &port, "-U", "apono", name])
                    .output()
                    .expect("createdb runs");
                if out.status.success() {
                    break;
                }
                let err = String::from_utf8_lossy(&out.stderr);
                // Many tests create databases at once: the template may be busy for a moment.
                if !err.contains("is being accessed by other users") || Instant::now() > deadline {
                    panic!("createdb {name}: {err}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.url(name)
    }

    pub fn url(&self, name: &str) -> SecretString {
        SecretString::from(format!("postgres://apono@127.0.0.1:{}/{name}", self.port))
    }

    /// For the shared server: a watcher that stops it (and removes its directory) when this
    /// process is gone, however it ends.
    pub fn stop_when_process_exits(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let prefix = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {prefix}'{}' -D '{}' -m immediate stop >/dev/null 2>&1; rm -rf '{}'",
            pg_ctl.display(),
            self.data_dir(),
            self.root.display(),
            pid = std::process::id(),
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn write_private(path: &Path, content: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options
        .open(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    f.write_all(content.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
