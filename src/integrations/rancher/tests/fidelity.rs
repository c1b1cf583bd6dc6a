//! Fidelity tests (issue 17): the connector against the simulator behaving as a given Rancher
//! release, for what Rancher's source says differs by kind and version (reviews/rancher-2.md N1,
//! N2, N3, N4, N6).

use super::*;

/// A binding as Rancher shows it now (`GET` by id, not counted by the test's requests).
async fn read_binding(sim: &SimHandle, collection: &str, id: &str) -> Value {
    let (access, secret) = sim.sim.api_key();
    reqwest::Client::new()
        .get(format!("{}/v3/{collection}/{id}", sim.base_url))
        .bearer_auth(format!("{access}:{secret}"))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json")
}

fn at_version(minor: u32) -> SimOptions {
    SimOptions {
        version: RancherVersion::new(minor),
        ..SimOptions::default()
    }
}

/// N1: a PRTB has no `status` on any version, so a project grant is granted when the binding
/// exists (and, for a principal, once Rancher made its user): no settle wait, no read back for a
/// user or a group. On 2.13 and on 2.10 alike.
#[tokio::test]
async fn a_project_grant_succeeds_without_waiting_for_a_status() {
    for minor in [10, 13] {
        let sim = sim_with(at_version(minor)).await;
        let r = rancher(&sim);
        admin_proven(&r).await;
        let (g, n) = counted(&sim, r.grant(&grant_req("bob", "project-member", "c-7x2k9:p-x4m7q"))).await;
        let g = g.unwrap_or_else(|e| panic!("2.{minor}: {e}"));
        assert_eq!(n, 3, "2.{minor}: lookup, listing, POST: nothing waits for a status");
        assert_eq!(
            matching(&sim, Some("u-bob01"), "project-member", "c-7x2k9:p-x4m7q")
                .iter()
                .map(|b| b.id.clone())
                .collect::<Vec<_>>(),
            g.binding_ids,
            "2.{minor}"
        );
        let (g, n) = counted(
            &sim,
            r.grant(&group_grant("github_team://777", "read-only", "c-7x2k9:p-abcde")),
        )
        .await;
        assert_eq!(g.unwrap().binding_ids.len(), 1, "2.{minor}");
        assert_eq!(n, 2, "2.{minor}: listing, POST");
        // By principal: read back once, for the user Rancher's EnsureUser makes.
        let (g, n) = counted(
            &sim,
            r.grant(&grant_req("github_user://6060", "read-only", "c-7x2k9:p-abcde")),
        )
        .await;
        let g = g.unwrap();
        assert_eq!(g.user_id, external_user_id("github_user://6060"), "2.{minor}");
        assert!(n >= 3, "2.{minor}: listing, POST, GET until the user is there ({n})");
        // Granted while Rancher shows no status on it, as it never will.
        let read = read_binding(&sim, "projectroletemplatebindings", &g.binding_ids[0]).await;
        assert!(read.get("status").is_none(), "2.{minor}: {read}");
        sim.stop().await;
    }
}

/// N4: a CRTB is granted once Rancher says `summary: Completed`, which it writes only after the
/// downstream cluster applied it; on 2.10 there is no status to wait for.
#[tokio::test]
async fn a_crtb_grant_waits_for_summary_on_2_13_and_not_on_2_10() {
    let sim = sim_with(SimOptions {
        settle: Duration::from_millis(700),
        ..at_version(13)
    })
    .await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let (g, n) = counted(&sim, r.grant(&grant_req("bob", "cluster-member", "c-7x2k9"))).await;
    let g = g.unwrap();
    assert!(n > 4, "lookup, listing, POST, then GETs until summary ({n})");
    let read = read_binding(&sim, "clusterroletemplatebindings", &g.binding_ids[0]).await;
    assert_eq!(
        read["status"]["summary"], "Completed",
        "granted only once the cluster applied it: {read}"
    );
    sim.stop().await;

    let old = sim_with(SimOptions {
        settle: Duration::from_secs(3600),
        ..at_version(10)
    })
    .await;
    let r = rancher(&old);
    r.grant(&grant_req("bob", "nodes-view", "c-7x2k9")).await.unwrap();
    let (g, n) = counted(&old, r.grant(&grant_req("bob", "cluster-member", "c-7x2k9"))).await;
    g.unwrap();
    assert_eq!(n, 3, "2.10: lookup, listing, POST once the version is known");
    old.stop().await;
}

/// N2: on 2.12+ a PRTB create for a project that does not exist is a 500
/// `projects.management.cattle.io "c-x/p-y" not found`: `not_found`, "project X not found",
/// after one POST (not retried), for every kind of subject, an external principal included.
/// Before 2.12 it is a 404, with the same result.
#[tokio::test]
async fn an_unknown_project_is_not_found_after_one_post_on_every_version() {
    for minor in [10, 12, 13] {
        let sim = sim_with(at_version(minor)).await;
        let r = rancher(&sim);
        admin_proven(&r).await;
        let before = sim.sim.bindings().len();
        for req in [
            grant_req("bob", "read-only", "c-7x2k9:p-nope1"),
            group_grant("github_team://777", "read-only", "c-7x2k9:p-nope1"),
            grant_req("github_user://5151", "read-only", "c-7x2k9:p-nope1"),
        ] {
            sim.sim.reset_stats();
            let e = r.grant(&req).await.unwrap_err();
            let who = format!("2.{minor} {:?}", req.subject);
            assert!(
                matches!(e, IntegrationError::NotFound { .. }) && !e.retryable(),
                "{who}: {e:?}"
            );
            assert!(
                e.to_string().contains("project c-7x2k9:p-nope1 not found"),
                "{who}: {e}"
            );
            assert_eq!(
                sim.sim.stats().route("POST /v3/projectroletemplatebindings"),
                1,
                "{who}: one POST, not retried"
            );
        }
        assert_eq!(sim.sim.bindings().len(), before, "2.{minor}: nothing was created");
        sim.stop().await;
    }
}

/// N3: a 500 on a binding by external principal is a configuration error only when the auth
/// provider says it cannot resolve the id; the admission webhook's pod restarting (or etcd) is
/// retried, and reported as Rancher being unavailable when it lasts.
#[tokio::test]
async fn a_webhook_500_on_an_external_principal_is_retried_not_a_configuration_error() {
    let post = "POST /v3/clusterroletemplatebindings";
    let webhook = "Internal error occurred: failed calling webhook \
                   \"rancher.cattle.io.clusterroletemplatebindings.management.cattle.io\": failed to call webhook: \
                   Post \"https://rancher-webhook.cattle-system.svc:443/v1/webhook/validation\": connection refused";
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    // Once: the retry goes through.
    sim.sim.fail_next_on_with(post, 1, 500, webhook);
    sim.sim.reset_stats();
    let g = r
        .grant(&grant_req("github_user://5151", "cluster-member", "c-7x2k9"))
        .await
        .unwrap();
    assert_eq!(g.user_id, external_user_id("github_user://5151"));
    assert_eq!(sim.sim.stats().route(post), 2, "the 500 was retried");
    sim.stop().await;
    // Every attempt: retryable, and not "use another key".
    for message in [webhook, "etcdserver: request timed out"] {
        let sim = super::sim().await;
        let r = rancher(&sim);
        sim.sim.fail_next_on_with(post, 1000, 500, message);
        let e = r
            .grant(&grant_req("github_user://6060", "cluster-owner", "c-m-4bq8z2lp"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, IntegrationError::Unavailable { .. }) && e.retryable(),
            "{message}: {e:?}"
        );
        assert!(!e.to_string().contains("auth provider"), "{e}");
        sim.stop().await;
    }
}

/// F5/N6: a key scoped to a cluster other than `local` is named with its cluster: a refused key
/// is probed with the clusters the connector's operations named on that Rancher (a scoped key
/// cannot list them).
#[tokio::test]
async fn a_key_scoped_to_any_cluster_is_named_with_its_cluster() {
    let sim = sim().await;
    let r = rancher(&sim);
    r.grant(&grant_req("bob", "cluster-member", "c-7x2k9")).await.unwrap();
    sim.sim.set_key_scope(Some("c-7x2k9"));
    for (what, e) in [
        ("validate", r.validate().await.unwrap_err()),
        (
            "revoke",
            r.revoke(&revoke_req("bob", "cluster-member", "c-7x2k9"))
                .await
                .unwrap_err(),
        ),
    ] {
        assert!(
            matches!(e, IntegrationError::CredentialsRefused { .. }),
            "{what}: {e:?}"
        );
        assert!(e.to_string().contains("scoped to cluster c-7x2k9"), "{what}: {e}");
    }
    // A project's cluster counts too; the probes are bounded.
    sim.sim.set_key_scope(None);
    r.grant(&grant_req("bob", "read-only", "c-m-4bq8z2lp:p-h6v9r"))
        .await
        .unwrap();
    sim.sim.set_key_scope(Some("c-m-4bq8z2lp"));
    sim.sim.reset_stats();
    let e = r.validate().await.unwrap_err();
    assert!(e.to_string().contains("scoped to cluster c-m-4bq8z2lp"), "{e}");
    let probes: u64 = sim.sim.stats().route("GET /v3/clusters/{id}");
    assert!(probes <= 4, "{probes} probes");
    sim.stop().await;
}

/// N2/N3 as pure classification: which 500s on a binding create are Rancher's final answer.
#[test]
fn binding_500s_are_final_only_for_an_unknown_role_or_project_or_an_unresolvable_principal() {
    use super::super::grant::{Kind, Target, binding_error, is_final_refusal};
    use super::super::names::BindingSubject;
    fn target(resource: &Resource, subject: BindingSubject) -> Target<'_> {
        Target {
            kind: Kind::of(resource),
            role: "read-only",
            resource,
            subject,
        }
    }
    let cluster = &Resource::Cluster("c-7x2k9".into());
    let project = &Resource::Project("c-7x2k9:p-nope1".into());
    let principal = || BindingSubject::UserPrincipal("github_user://42".into());
    let e500 = |message: &str| api_error(500, Some("ServerError"), message, None);

    // The provider's "cannot resolve this id": final, a configuration error.
    for message in [
        "users.management.cattle.io \"42\" not found",
        "invalid id github_user:42",
        "SAML: Invalid principal type",
        "invalid principal type: team",
        "cannot get the github account due to invalid externalIDType team",
    ] {
        let t = target(cluster, principal());
        assert!(is_final_refusal(&t, &e500(message)), "{message}");
        let e = binding_error(&t, e500(message));
        assert!(
            matches!(e, IntegrationError::Config { .. }) && !e.retryable(),
            "{message}: {e:?}"
        );
    }
    // Anything else on the same create: retryable.
    for message in [
        "Internal error occurred: failed calling webhook \"rancher.cattle.io.clusterroletemplatebindings.management.cattle.io\": connection refused",
        "etcdserver: request timed out",
        "Get \"https://ldap.example.com\": dial tcp 10.0.0.1:636: i/o timeout",
        "context deadline exceeded",
    ] {
        let t = target(cluster, principal());
        assert!(!is_final_refusal(&t, &e500(message)), "{message}");
        assert!(binding_error(&t, e500(message)).retryable(), "{message}");
    }
    // 2.12+: the unknown project, whoever the subject: not found, final.
    let unknown = "projects.management.cattle.io \"c-7x2k9/p-nope1\" not found";
    for subject in [
        principal(),
        BindingSubject::UserId("u-bob01".into()),
        BindingSubject::GroupPrincipal("github_team://777".into()),
    ] {
        let t = target(project, subject);
        assert!(is_final_refusal(&t, &e500(unknown)));
        let e = binding_error(&t, e500(unknown));
        assert!(
            matches!(e, IntegrationError::NotFound { .. }) && !e.retryable(),
            "{e:?}"
        );
        assert!(e.to_string().contains("project c-7x2k9:p-nope1 not found"), "{e}");
    }
    // The same words on a cluster binding are not about its resource.
    assert!(!is_final_refusal(
        &target(cluster, BindingSubject::UserId("u-bob01".into())),
        &e500(unknown)
    ));
}
