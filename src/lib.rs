//! apono-connector: an agent that grants and revokes just-in-time access to Rancher with
//! credentials that stay in the customer's own secret stores.
//!
//! # Layout
//!
//! - [`config`]: loading and validating configuration (defaults < TOML file < environment).
//! - [`control_plane`]: protocol v1 types, the HTTP client, the embedded control plane (SQLite)
//!   and its HTTP server.
//! - [`agent`]: poll loop, worker pool, lease renewal, retries, shutdown, and the job executor,
//!   where one job's path reads top to bottom.
//! - [`secrets`]: the `SecretStore` trait and its stores.
//! - [`integrations`]: the `Integration` trait and the Rancher integration.
//! - [`sim`]: a wire-compatible Rancher simulator for the demo, tests and benchmarks.
//! - [`telemetry`]: logs, Prometheus metrics and the `/healthz` `/readyz` `/metrics` server.
//! - [`commands`]: one function per CLI command.
//! - [`demo`]: the one-command demo.
//!
//! `main.rs` only parses the command line and calls into these.

pub mod agent;
pub mod commands;
pub mod config;
pub mod control_plane;
pub mod demo;
pub mod integrations;
pub mod secrets;
pub mod sim;
pub mod telemetry;

/// The agent's version, reported in the session hello.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and its causes on one line (`outer: cause: root`), each cause added only when the line
/// does not hold its text already (many errors repeat their source). HTTP and SDK errors print
/// only their outermost layer ("error sending request"); the reason an operator needs
/// ("Connection refused", "invalid peer certificate: UnknownIssuer") is in a cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(&'static str, #[source] Option<Box<Layer>>);

    #[test]
    fn error_chain_names_every_cause_once() {
        let root = Layer("Connection refused", None);
        let repeats = Layer("connect failed: Connection refused", Some(Box::new(root)));
        let outer = Layer("error sending request", Some(Box::new(repeats)));
        assert_eq!(
            super::error_chain(&outer),
            "error sending request: connect failed: Connection refused"
        );
    }
}
