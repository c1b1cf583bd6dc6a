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
