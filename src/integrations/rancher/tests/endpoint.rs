//! One HTTP client per Rancher endpoint, shared by every job: counted in clients built and in
//! connections the simulator accepted.

use super::*;

/// `jobs` jobs for one integration at once, each building its integration as the executor does.
async fn validate_at_once(spec: &IntegrationSpec, secret: &Secret, jobs: usize) {
    let jobs = (0..jobs).map(|_| {
        let integration = crate::integrations::build(spec, secret).unwrap();
        async move { integration.validate().await }
    });
    for outcome in futures::future::join_all(jobs).await {
        outcome.unwrap();
    }
}

/// 100 jobs for one integration, each building its integration as the executor does, share one
/// client: one build, and connections bounded by the endpoint's cap on requests in flight (with
/// a client per job, each job opened its own).
#[tokio::test]
async fn many_jobs_for_one_integration_share_one_client_and_its_connections() {
    const JOBS: usize = 100;
    const CAP: usize = 4;
    let sim = sim().await;
    let (access, key) = sim.sim.api_key();
    let spec: IntegrationSpec = serde_json::from_value(json!({
        "type": "rancher",
        "name": "shared",
        "config": {"host": sim.base_url, "max_requests": CAP},
        "secret_store": {"type": "APONO", "credentials": {}},
    }))
    .unwrap();
    let secret = secret(&[("access_key", &access), ("secret_key", &key)]);
    sim.sim.reset_stats();
    validate_at_once(&spec, &secret, JOBS).await;
    let serials: std::collections::BTreeSet<u64> = (0..JOBS)
        .map(|_| Rancher::new(&spec, &secret).unwrap().client().endpoint().serial())
        .collect();
    assert_eq!(serials.len(), 1, "one client for one endpoint, got builds {serials:?}");
    let stats = sim.sim.stats();
    assert!(stats.total >= JOBS as u64, "every job reached Rancher: {stats:?}");
    // A connection returns to the pool just after its permit: allow one extra round of them.
    assert!(
        stats.connections <= 2 * CAP as u64,
        "{} connections for {JOBS} jobs with at most {CAP} requests in flight",
        stats.connections
    );

    // Another endpoint configuration (another cap) is another client.
    let other: IntegrationSpec = serde_json::from_value(json!({
        "type": "rancher", "name": "other",
        "config": {"host": sim.base_url, "max_requests": CAP + 1},
        "secret_store": {"type": "APONO", "credentials": {}},
    }))
    .unwrap();
    let other = Rancher::new(&other, &secret).unwrap().client().endpoint().serial();
    assert!(!serials.contains(&other));
    sim.stop().await;
}

/// Over `https://` (the simulator with TLS): 100 jobs for one integration cost TLS handshakes
/// bounded by the endpoint's pool, not one per job, and the simulator counts them.
#[tokio::test]
async fn many_jobs_over_https_handshake_once_per_pooled_connection_not_per_job() {
    const JOBS: usize = 100;
    const CAP: usize = 4;
    let (sim, tls) = SimHandle::start_tls(SimOptions::default()).await.unwrap();
    assert!(sim.base_url.starts_with("https://"), "{}", sim.base_url);
    let (access, key) = sim.sim.api_key();
    let spec: IntegrationSpec = serde_json::from_value(json!({
        "type": "rancher",
        "name": "shared-tls",
        "config": {"host": sim.base_url, "max_requests": CAP, "certificate_authority": tls.cert_pem()},
        "secret_store": {"type": "APONO", "credentials": {}},
    }))
    .unwrap();
    let secret = secret(&[("access_key", &access), ("secret_key", &key)]);
    sim.sim.reset_stats();
    validate_at_once(&spec, &secret, JOBS).await;
    let stats = sim.sim.stats();
    assert!(stats.total >= JOBS as u64, "every job reached Rancher: {stats:?}");
    assert!(stats.handshakes >= 1, "the simulator counted no handshake: {stats:?}");
    assert!(
        stats.handshakes <= 2 * CAP as u64,
        "{} TLS handshakes for {JOBS} jobs with at most {CAP} requests in flight",
        stats.handshakes
    );
    assert!(stats.handshakes <= stats.connections, "{stats:?}");

    // Without the CA the handshake fails: the jobs get a TLS error, and nothing is counted.
    let untrusting: IntegrationSpec = serde_json::from_value(json!({
        "type": "rancher", "name": "untrusting",
        "config": {"host": sim.base_url},
        "secret_store": {"type": "APONO", "credentials": {}},
    }))
    .unwrap();
    let before = sim.sim.stats().handshakes;
    let e = crate::integrations::build(&untrusting, &secret)
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    assert!(matches!(e, IntegrationError::Config { .. }), "{e:?}");
    assert_eq!(sim.sim.stats().handshakes, before);
    sim.stop().await;
}
