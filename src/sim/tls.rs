//! The simulator over `https://`: a self-signed certificate made at start, and a count of the
//! TCP connections and TLS handshakes it accepted, so a test or a benchmark can tell a client
//! that reuses its pool (one handshake per pooled connection) from one that handshakes per job.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Sim;

/// A server identity for the simulator: a self-signed certificate for `localhost`, `127.0.0.1`
/// and `::1`, and the rustls configuration serving it. The certificate's PEM is what a client
/// trusts (the integration's `certificate_authority`).
#[derive(Clone)]
pub struct TlsIdentity {
    cert_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    // The private key stays out of Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// A new key pair and certificate (about a millisecond).
    ///
    /// # Errors
    /// Key generation or the TLS setup failed (a message saying which).
    pub fn self_signed() -> Result<TlsIdentity, String> {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        let made = rcgen::generate_simple_self_signed(names)
            .map_err(|e| format!("cannot make the simulator's certificate: {e}"))?;
        let cert_pem = made.cert.pem();
        let chain = vec![CertificateDer::from(made.cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        // The provider is named: the process may not have installed a default one.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS for the simulator: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("cannot set up TLS for the simulator: {e}"))?;
        // The connection is served as HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsIdentity {
            cert_pem,
            config: Arc::new(config),
        })
    }

    /// The certificate, PEM: give it to the client as the CA to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
}

impl Sim {
    /// Serves the simulator over TLS on `listener` until `shutdown` completes, counting each
    /// accepted connection ([`super::SimStats::connections`]) and each completed handshake
    /// ([`super::SimStats::handshakes`], resumed ones also in `resumed_handshakes`). At shutdown,
    /// open connections are dropped.
    ///
    /// # Errors
    /// None so far: accept errors (a full file table) are waited out, not returned.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: &TlsIdentity,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let acceptor = TlsAcceptor::from(tls.config.clone());
        let app = self.router();
        let mut connections = tokio::task::JoinSet::new();
        let shutdown = std::pin::pin!(shutdown);
        let mut shutdown = shutdown;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else {
                        // EMFILE and the like: let connections close, then accept again.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    self.count_connection();
                    let (acceptor, app, sim) = (acceptor.clone(), app.clone(), self.clone());
                    connections.spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        // A client that fails the handshake (an untrusted certificate) is not counted.
                        let Ok(stream) = acceptor.accept(tcp).await else { return };
                        let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                        sim.count_handshake(resumed);
                        let service = hyper_util::service::TowerToHyperService::new(app);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        connections.shutdown().await;
        Ok(())
    }
}
