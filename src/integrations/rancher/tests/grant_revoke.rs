//! grant_revoke tests (issue 10): against the simulator, or a scripted server where it cannot do the thing.

use super::*;

/// Rancher answers an unknown role template on a CRTB/PRTB with a **500** (Norman's validator,
/// rancher `pkg/api/norman/customization/roletemplatebinding/validator.go`) and an unknown global
/// role with a **404** (`store/globalrolebindings/globalrolebinding_store.go`). Both say the role
/// does not exist, are not retried by the job, and cost one POST (the client does not retry the
/// 500 either).
#[tokio::test]
async fn an_unknown_role_is_invalid_after_one_post() {
    let sim = sim().await;
    let r = rancher(&sim);
    // The grant proves the key an admin first (cached): proven here, so the counts are the grant's.
    admin_proven(&r).await;
    let before = sim.sim.bindings().len();
    for (resource, post, noun) in [
        ("c-7x2k9", "POST /v3/clusterroletemplatebindings", "cluster role"),
        (
            "c-7x2k9:p-abcde",
            "POST /v3/projectroletemplatebindings",
            "project role",
        ),
        ("global", "POST /v3/globalrolebindings", "global role"),
    ] {
        sim.sim.reset_stats();
        let e = r.grant(&grant_req("bob", "no-such-role", resource)).await.unwrap_err();
        assert!(
            matches!(e, IntegrationError::Invalid { .. }) && !e.retryable(),
            "{resource}: {e:?}"
        );
        assert!(
            e.to_string()
                .contains(&format!("role \"no-such-role\" does not exist in Rancher as a {noun}")),
            "{e}"
        );
        let stats = sim.sim.stats();
        assert_eq!(stats.route(post), 1, "{resource}: one POST, not retried");
        assert!(
            stats.total <= 3,
            "{resource}: user lookup, listing, POST ({})",
            stats.total
        );
    }
    assert_eq!(sim.sim.bindings().len(), before, "nothing was created");
    sim.stop().await;
}

/// A Terraform- or UI-made binding for the same person is bound by `userId`, and Rancher fills
/// `userPrincipalId` in only with `local://<userId>` (`crtb_handler.go`): a revoke by the
/// external principal lists by `userId` too. It still removes only the connector's bindings of
/// this grant.
#[tokio::test]
async fn a_revoke_by_principal_finds_the_persons_bindings_made_by_user_id() {
    let sim = sim().await;
    let r = rancher(&sim);
    let octo = external_user_id("github_user://4242");
    let by_user_id = |mut b: SimBinding| {
        b.user_principal_id = None;
        b
    };
    // Ours, this grant, made by userId (a grant by username), by a build before owners.
    let octo1 = legacy_binding("cluster-member", "c-7x2k9", &octo, Some("acc-7"), None);
    sim.sim.add_binding(by_user_id(octo1.clone())).unwrap();
    // Someone's standing access, by userId.
    sim.sim
        .add_binding(by_user_id(planted(
            "c-7x2k9:crtb-octo2",
            "cluster-member",
            "c-7x2k9",
            &octo,
        )))
        .unwrap();
    // Another connector's, by userId.
    let other = Owner::new("standalone", "other-install").unwrap();
    let octo3 = connector_binding(&other, "cluster-member", "c-7x2k9", &octo, Some("acc-8"), None);
    sim.sim.add_binding(by_user_id(octo3.clone())).unwrap();
    // Granted now by principal: the grant lists by principal, so it makes its own binding.
    let mut req = grant_req("github_user://4242", "cluster-member", "c-7x2k9");
    req.grant_id = Some("acc-7".into());
    let g = r.grant(&req).await.unwrap();
    assert_eq!(g.user_id, octo);

    let mut rv = revoke_req("github_user://4242", "cluster-member", "c-7x2k9");
    rv.grant_id = Some("acc-7".into());
    let out = r.revoke(&rv).await.unwrap();
    let mut expect = vec![octo1.id.clone()];
    expect.extend(g.binding_ids.iter().cloned());
    expect.sort();
    assert_eq!(out.removed_binding_ids, expect, "{out:?}");
    assert_eq!(out.left_binding_ids, vec!["c-7x2k9:crtb-octo2".to_string()]);
    assert_eq!(out.user_id.as_deref(), Some(octo.as_str()));
    let mut left: Vec<String> = matching(&sim, Some(&octo), "cluster-member", "c-7x2k9")
        .into_iter()
        .map(|b| b.id)
        .collect();
    left.sort();
    let mut expect_left = vec!["c-7x2k9:crtb-octo2".to_string(), octo3.id.clone()];
    expect_left.sort();
    assert_eq!(left, expect_left);
    sim.stop().await;
}

/// A binding whose finalizers never finish (its downstream cluster's agent is disconnected)
/// may still grant access there: the revoke fails closed, says so and what to check, whether
/// it has the binding's id recorded or finds it by listing.
#[tokio::test]
async fn a_removal_stuck_on_its_finalizers_fails_closed_and_says_what_to_check() {
    let sim = sim().await;
    let r = rancher_with(&sim, json!({"status_timeout_seconds": 1}), None);
    let mut req = grant_req("bob", "cluster-member", "c-7x2k9");
    req.grant_id = Some("acc-1".into());
    let g = r.grant(&req).await.unwrap();
    sim.sim.set_removal_delay(Duration::from_secs(600));
    let mut rv = revoke_req("bob", "cluster-member", "c-7x2k9");
    rv.grant_id = Some("acc-1".into());
    rv.user_id = Some("u-bob01".into());
    rv.binding_ids = g.binding_ids.clone();
    let e = r.revoke(&rv).await.unwrap_err();
    assert!(
        matches!(e, IntegrationError::InProgress { .. }) && e.retryable(),
        "{e:?}"
    );
    let m = e.to_string();
    assert!(m.contains(&g.binding_ids[0]), "{m}");
    assert!(
        m.contains("finalizers may be stuck") && m.contains("disconnected"),
        "{m}"
    );
    // The one-shot CLI revoke (nothing recorded) finds it by listing, being removed: not done.
    let e = r
        .revoke(&revoke_req("bob", "cluster-member", "c-7x2k9"))
        .await
        .unwrap_err();
    assert!(matches!(e, IntegrationError::InProgress { .. }), "{e:?}");
    assert!(e.to_string().contains(&g.binding_ids[0]), "{e}");
    sim.stop().await;
}

/// Rancher gives the users it makes for principals (EnsureUser) the global roles marked
/// `newUserDefault` (`usermanager.go` `createUsersBindings`). Those bindings are not the
/// connector's: a revoke never removes them, a grant of that role is pre-existing access.
#[tokio::test]
async fn the_default_roles_of_users_rancher_makes_are_not_the_connectors() {
    let sim = sim().await;
    let r = rancher(&sim);
    let g = r
        .grant(&grant_req("github_user://5151", "cluster-member", "c-7x2k9"))
        .await
        .unwrap();
    let hubot = g.user_id.clone();
    assert_eq!(hubot, external_user_id("github_user://5151"));
    let defaults = matching(&sim, Some(&hubot), "user", "global");
    assert_eq!(
        defaults.len(),
        1,
        "EnsureUser gave the newUserDefault role: {defaults:?}"
    );
    assert!(!defaults[0].labels.contains_key(CREATED_BY_LABEL));
    // Granting that role: already there, nothing created.
    let u = r
        .grant(&grant_req("github_user://5151", "user", "global"))
        .await
        .unwrap();
    assert!(u.pre_existing && u.binding_ids.is_empty(), "{u:?}");
    assert_eq!(u.pre_existing_binding_ids, vec![defaults[0].id.clone()]);
    // Revoking the cluster access leaves the default role alone.
    let out = r
        .revoke(&revoke_req("github_user://5151", "cluster-member", "c-7x2k9"))
        .await
        .unwrap();
    assert_eq!(out.removed_binding_ids, g.binding_ids);
    assert!(out.left_binding_ids.is_empty(), "{out:?}");
    // Revoking the role itself (the CLI, no grant id): reported as left, not removed.
    let out = r
        .revoke(&revoke_req("github_user://5151", "user", "global"))
        .await
        .unwrap();
    assert!(out.removed_binding_ids.is_empty(), "{out:?}");
    assert_eq!(out.left_binding_ids, vec![defaults[0].id.clone()]);
    assert_eq!(matching(&sim, Some(&hubot), "user", "global").len(), 1);
    sim.stop().await;
}

/// The 409 AlreadyExists path (a listing that missed the connector's binding) reads the binding
/// back and checks its status like a new one: in place is not granted until `Completed`.
#[tokio::test]
async fn a_binding_found_by_its_name_is_awaited_like_a_new_one() {
    let sim = sim_with(SimOptions {
        settle: Duration::from_secs(600),
        ..SimOptions::default()
    })
    .await;
    let r = rancher_with(&sim, json!({"status_timeout_seconds": 1}), None);
    let req = grant_req("bob", "cluster-member", "c-7x2k9");
    let e = r.grant(&req).await.unwrap_err();
    assert!(matches!(e, IntegrationError::InProgress { .. }), "{e:?}");
    sim.sim.empty_lists_on("GET /v3/clusterroletemplatebindings", 1);
    sim.sim.reset_stats();
    let e = r.grant(&req).await.unwrap_err();
    assert!(matches!(e, IntegrationError::InProgress { .. }), "{e:?}");
    assert_eq!(sim.sim.stats().route("POST /v3/clusterroletemplatebindings"), 1);
    // Applied: the same path now succeeds, with the one binding.
    sim.sim.reconcile_now();
    sim.sim.empty_lists_on("GET /v3/clusterroletemplatebindings", 1);
    let g = r.grant(&req).await.unwrap();
    assert!(
        e.to_string().contains(&g.binding_ids[0]),
        "{e} names {:?}",
        g.binding_ids
    );
    assert_eq!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").len(), 1);
    sim.stop().await;
}

/// Rancher created the binding but its controller reports `Error` applying it: a retryable
/// error carrying Rancher's reasons. Scripted: the simulator's controller errors only for a
/// user that does not exist, which the grant checks first.
#[tokio::test]
async fn a_binding_rancher_fails_to_apply_is_retryable_with_its_reasons() {
    use axum::Router;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route(
            "/v3/users",
            get(|| async { axum::Json(json!({"data": [{"id": "u-bob01", "username": "bob"}]})) }),
        )
        .route(
            "/v3/clusterroletemplatebindings/{id}",
            get(|axum::extract::Path(id): axum::extract::Path<String>| async move {
                axum::Json(json!({
                    "id": id, "clusterId": "c-1", "roleTemplateId": "cluster-member", "userId": "u-bob01",
                    "status": {
                        "summary": "Error", "summaryLocal": "Completed", "summaryRemote": "Error",
                        "remoteConditions": [{"type": "BindingsExist", "status": "False",
                            "message": "failed to create cluster role binding: etcdserver: too many requests"}],
                    },
                }))
            }),
        )
        .route(
            "/v3/clusterroletemplatebindings",
            get(|| async { axum::Json(json!({"data": []})) }).post(|body: axum::Json<Value>| async move {
                let name = body["name"].as_str().unwrap_or_default().to_string();
                (
                    axum::http::StatusCode::CREATED,
                    axum::Json(json!({
                        "id": format!("c-1:{name}"), "name": name, "clusterId": "c-1",
                        "roleTemplateId": "cluster-member", "userId": "u-bob01",
                    })),
                )
            }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let key = ApiKey::from_secret(&secret(&[("token", "token-x:y")])).unwrap();
    let r = Rancher::from_parts(RancherConfig::from_value(&json!({"host": base})).unwrap(), key).unwrap();
    r.remember_proof();
    let e = r.grant(&grant_req("bob", "cluster-member", "c-1")).await.unwrap_err();
    assert!(
        matches!(e, IntegrationError::Unavailable { .. }) && e.retryable(),
        "{e:?}"
    );
    let m = e.to_string();
    assert!(
        m.contains("c-1:crtb-") && m.contains("BindingsExist: failed to create cluster role binding"),
        "{m}"
    );
    server.abort();
}
