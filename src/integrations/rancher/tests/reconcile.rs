//! The reconcile's table of cases (`reconcile.rs`), one test per row, and what makes a binding
//! the connector's (`model::Ownership`) on the grant and revoke paths (issue 17).

use super::*;
use crate::integrations::{BoundSubject, HeldAccess, HeldState};

fn me() -> Owner {
    Owner::new("standalone", "install-a").unwrap()
}

/// An access as the control plane lists it for the reconcile.
fn held(grant_id: &str, user: &str, role: &str, resource: &str, state: HeldState) -> HeldAccess {
    HeldAccess {
        grant_id: grant_id.into(),
        subject: Subject::user(user),
        role: role.into(),
        resource: Resource::parse(resource).unwrap(),
        state,
        user_id: None,
        bound_subject: None,
        binding_ids: Vec::new(),
        expires_at: None,
        pre_existing: false,
    }
}

fn reconcile_with(accesses: Vec<HeldAccess>) -> SweepRequest {
    SweepRequest {
        owner: Some(me()),
        accesses: Some(accesses),
        ..SweepRequest::default()
    }
}

/// The grant of this connector's access `grant_id`.
fn my_grant(user: &str, role: &str, resource: &str, grant_id: &str) -> GrantRequest {
    GrantRequest {
        owner: Some(me()),
        grant_id: Some(grant_id.into()),
        ..grant_req(user, role, resource)
    }
}

/// The revoke of this connector's access `grant_id` (what its grant recorded is set by the test).
fn my_revoke(user: &str, role: &str, resource: &str, grant_id: &str) -> RevokeRequest {
    RevokeRequest {
        owner: Some(me()),
        grant_id: Some(grant_id.into()),
        ..revoke_req(user, role, resource)
    }
}

fn ids_of(result: &SweepResult) -> Vec<String> {
    let mut ids: Vec<String> = result.removed.iter().map(|b| b.id.clone()).collect();
    ids.sort();
    ids
}

fn present(sim: &SimHandle, id: &str) -> bool {
    sim.sim.bindings().iter().any(|b| b.id == id)
}

fn expiry_of(sim: &SimHandle, id: &str) -> Option<String> {
    sim.sim
        .bindings()
        .into_iter()
        .find(|b| b.id == id)
        .and_then(|b| b.annotations.get(EXPIRES_AT_ANNOTATION).cloned())
}

/// Rows "ours, held, expiry earlier than a live holder's" and "ours, held": the expiry moves to
/// the latest live holder's (one PUT), and nothing held is removed, expired or not.
#[tokio::test]
async fn a_held_binding_is_kept_and_its_expiry_moved_to_its_latest_holder() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let soon = Utc::now() + chrono::Duration::minutes(5);
    let later = Utc::now() + chrono::Duration::hours(2);
    let b = connector_binding(&me(), "cluster-member", "c-7x2k9", "u-bob01", Some("ar-1"), Some(soon));
    sim.sim.add_binding(b.clone()).unwrap();
    let past = Utc::now() - chrono::Duration::minutes(5);
    let expired_but_held = connector_binding(&me(), "cluster-owner", "c-7x2k9", "u-bob01", Some("ar-3"), Some(past));
    sim.sim.add_binding(expired_but_held.clone()).unwrap();
    let mut a1 = held("ar-1", "bob", "cluster-member", "c-7x2k9", HeldState::Active);
    a1.binding_ids = vec![b.id.clone()];
    a1.expires_at = Some(soon);
    let mut a2 = a1.clone();
    a2.grant_id = "ar-2".into();
    a2.expires_at = Some(later);
    let mut a3 = held("ar-3", "bob", "cluster-owner", "c-7x2k9", HeldState::Revoking);
    a3.binding_ids = vec![expired_but_held.id.clone()];
    let (out, n) = counted(&sim, r.sweep(&reconcile_with(vec![a1, a2, a3]))).await;
    let out = out.unwrap();
    assert_eq!(n, 3 + 1, "three listings and one PUT, nothing else: {out:?}");
    assert_eq!(out.extended_binding_ids, vec![b.id.clone()]);
    assert_eq!(expiry_of(&sim, &b.id), Some(format_expiry(later)));
    assert!(out.removed.is_empty() && out.missing.is_empty(), "{out:?}");
    assert!(present(&sim, &expired_but_held.id), "a revoking access still holds it");
    assert_eq!(out.kept_binding_ids, vec![expired_but_held.id.clone()]);
    // Once moved, the next pass changes nothing: listings only.
    let (again, n) = counted(&sim, r.sweep(&reconcile_with(Vec::new()))).await;
    let again = again.unwrap();
    assert!(again.extended_binding_ids.is_empty(), "{again:?}");
    assert_eq!(
        ids_of(&again),
        vec![expired_but_held.id.clone()],
        "no longer held: expired"
    );
    assert_eq!(
        n,
        3 + 3,
        "three listings; read again, DELETE, and the GET that proves it gone"
    );
    sim.stop().await;
}

/// Rows "ours, not held, grant id of a live access" (kept: its grant is running), "ours, not
/// held, accesses known, older than the grace" (removed as unclaimed), and the same with the
/// accesses unknown or younger than the grace (kept).
#[tokio::test]
async fn an_unclaimed_binding_of_ours_is_removed_once_old_enough_and_a_running_grants_is_kept() {
    let sim = sim().await;
    let r = rancher_with(&sim, json!({"unclaimed_grace_seconds": 0}), None);
    admin_proven(&r).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    let leftover = connector_binding(
        &me(),
        "cluster-member",
        "c-7x2k9",
        "u-bob01",
        Some("ar-gone"),
        Some(later),
    );
    let running = connector_binding(
        &me(),
        "cluster-owner",
        "c-7x2k9",
        "u-bob01",
        Some("ar-run"),
        Some(later),
    );
    let theirs = connector_binding(
        &Owner::new("standalone", "install-b").unwrap(),
        "cluster-member",
        "c-7x2k9",
        "u-alice1",
        Some("ar-x"),
        Some(later),
    );
    let login = connector_binding(&me(), "user-base", "global", "u-bob01", None, None);
    for b in [&leftover, &running, &theirs, &login] {
        sim.sim.add_binding(b.clone()).unwrap();
    }
    // Without the accesses (an operator's `sweep`, or a control plane that does not send them)
    // nothing unexpired is removed.
    let blind = r
        .sweep(&SweepRequest {
            owner: Some(me()),
            ..SweepRequest::default()
        })
        .await
        .unwrap();
    assert!(blind.removed.is_empty(), "{blind:?}");
    // With a grace longer than the binding's age, it is kept too.
    let patient = rancher(&sim);
    let kept = patient
        .sweep(&reconcile_with(vec![held(
            "ar-run",
            "bob",
            "cluster-owner",
            "c-7x2k9",
            HeldState::Pending,
        )]))
        .await
        .unwrap();
    assert!(kept.removed.is_empty(), "{kept:?}");
    let out = r
        .sweep(&reconcile_with(vec![held(
            "ar-run",
            "bob",
            "cluster-owner",
            "c-7x2k9",
            HeldState::Pending,
        )]))
        .await
        .unwrap();
    assert_eq!(ids_of(&out), vec![leftover.id.clone()]);
    assert_eq!(out.removed[0].reason, SweptReason::Unclaimed);
    assert!(!present(&sim, &leftover.id));
    for b in [&running, &theirs, &login] {
        assert!(present(&sim, &b.id), "{} stays", b.id);
    }
    sim.stop().await;
}

/// Rows "active, no binding in Rancher" (its own deleted by a person, or the standing binding of a
/// `pre_existing` access gone): reported missing. "Some equal binding present" and "pending or
/// revoking": nothing.
#[tokio::test]
async fn an_active_access_without_any_binding_is_reported_missing() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    // bob: his binding was deleted by a person.
    let mut deleted = held("ar-del", "bob", "cluster-member", "c-7x2k9", HeldState::Active);
    deleted.user_id = Some("u-bob01".into());
    deleted.binding_ids = vec!["c-7x2k9:crtb-0000000000000000".into()];
    deleted.expires_at = Some(later);
    // alice: pre-existing on `local:crtb-al1ce` (seeded), which a person then deletes.
    let mut standing = held("ar-std", "alice", "cluster-owner", "local", HeldState::Active);
    standing.user_id = Some("u-alice1".into());
    standing.pre_existing = true;
    // A group, bound by its principal: its binding is there.
    let g = r
        .grant(&group_grant("github_team://888", "cluster-owner", "c-7x2k9"))
        .await
        .unwrap();
    let mut group = held("ar-grp", "x", "cluster-owner", "c-7x2k9", HeldState::Active);
    group.subject = Subject::GroupPrincipal("github_team://888".into());
    group.bound_subject = Some(BoundSubject {
        field: "groupPrincipalId".into(),
        value: "github_team://888".into(),
    });
    group.binding_ids = g.binding_ids.clone();
    // Pending and revoking accesses are their jobs' business.
    let mut pending = deleted.clone();
    pending.grant_id = "ar-pen".into();
    pending.state = HeldState::Pending;
    let mut revoking = deleted.clone();
    revoking.grant_id = "ar-rev".into();
    revoking.state = HeldState::Revoking;
    let accesses = vec![deleted, standing, group, pending, revoking];
    let before = r.sweep(&reconcile_with(accesses.clone())).await.unwrap();
    let missing: Vec<&str> = before.missing.iter().map(|m| m.grant_id.as_str()).collect();
    assert_eq!(missing, vec!["ar-del"], "{before:?}");
    assert!(before.missing[0].reason.contains("cluster-member"), "{before:?}");
    assert!(sim.sim.remove_binding("local:crtb-al1ce"));
    let after = r.sweep(&reconcile_with(accesses)).await.unwrap();
    let missing: Vec<&str> = after.missing.iter().map(|m| m.grant_id.as_str()).collect();
    assert_eq!(missing, vec!["ar-del", "ar-std"], "{after:?}");
    assert!(after.missing[1].reason.contains("was there before"), "{after:?}");
    sim.stop().await;
}

/// A grant that meets the binding of a build before owners (its pre-owner name, no label)
/// adopts it: ours from then on (label, owner, expiry), recorded, and removed by its revoke.
#[tokio::test]
async fn a_grant_adopts_a_binding_of_a_build_before_owners() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let mut old = legacy_binding("cluster-member", "c-7x2k9", "u-bob01", None, None);
    old.labels.clear();
    sim.sim.add_binding(old.clone()).unwrap();
    let mut req = my_grant("bob", "cluster-member", "c-7x2k9", "ar-1");
    req.expires_at = Some(Utc::now() + chrono::Duration::hours(1));
    let g = r.grant(&req).await.unwrap();
    assert!(!g.pre_existing, "{g:?}");
    assert_eq!(g.binding_ids, vec![old.id.clone()], "{g:?}");
    let b = sim.sim.bindings().into_iter().find(|b| b.id == old.id).unwrap();
    assert_eq!(
        b.labels.get(CREATED_BY_LABEL).map(String::as_str),
        Some("apono-connector")
    );
    assert_eq!(b.annotations.get(OWNER_ANNOTATION).cloned(), Some(me().to_string()));
    assert_eq!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").len(), 1);
    let rv = my_revoke("bob", "cluster-member", "c-7x2k9", "ar-1");
    let out = r.revoke(&rv).await.unwrap();
    assert_eq!(out.removed_binding_ids, vec![old.id.clone()]);
    assert!(matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").is_empty());
    sim.stop().await;
}

/// Two connectors never share a binding: a grant next to another connector's binding makes its
/// own, and each revoke removes only its own. On 2.14+ Rancher refuses an equal binding under
/// another name: then the other connector's is recorded as pre-existing access (never deleted),
/// and the reconcile repairs the access if it goes.
#[tokio::test]
async fn two_connectors_each_make_their_own_binding() {
    for minor in [13, 14] {
        let sim = SimHandle::start(SimOptions {
            version: RancherVersion::new(minor),
            ..SimOptions::default()
        })
        .await
        .unwrap();
        let r = rancher(&sim);
        admin_proven(&r).await;
        let other = Owner::new("standalone", "install-b").unwrap();
        let mut theirs = grant_req("bob", "cluster-member", "c-7x2k9");
        theirs.owner = Some(other.clone());
        theirs.grant_id = Some("ar-b".into());
        let gb = r.grant(&theirs).await.unwrap();
        let mut ours = theirs.clone();
        ours.owner = Some(me());
        ours.grant_id = Some("ar-a".into());
        let ga = r.grant(&ours).await.unwrap();
        if minor >= 14 {
            assert!(ga.pre_existing && ga.binding_ids.is_empty(), "2.{minor}: {ga:?}");
            assert_eq!(ga.pre_existing_binding_ids, gb.binding_ids);
        } else {
            assert!(!ga.pre_existing, "2.{minor}: {ga:?}");
            assert_ne!(ga.binding_ids, gb.binding_ids, "2.{minor}: its own binding");
        }
        let mut rv = my_revoke("bob", "cluster-member", "c-7x2k9", "ar-a");
        rv.binding_ids = ga.binding_ids.clone();
        let out = r.revoke(&rv).await.unwrap();
        assert!(
            !out.removed_binding_ids.contains(&gb.binding_ids[0]),
            "2.{minor}: {out:?}"
        );
        assert!(
            present(&sim, &gb.binding_ids[0]),
            "2.{minor}: the other connector's binding stays"
        );
        sim.stop().await;
    }
}

/// The cleanup of a grant that failed after its POST has no recorded ids: it deletes the id the
/// grant derives, by id, whatever a lagging listing says (lifecycle D6).
#[tokio::test]
async fn a_cleanup_without_recorded_ids_deletes_the_derived_id_whatever_the_listing_says() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    for (role, resource, collection) in [
        ("cluster-member", "c-7x2k9", "clusterroletemplatebindings"),
        ("project-owner", "c-7x2k9:p-abcde", "projectroletemplatebindings"),
        ("clusters-create", "global", "globalrolebindings"),
    ] {
        let req = my_grant("bob", role, resource, "ar-failed");
        let g = r.grant(&req).await.unwrap();
        assert_eq!(g.binding_ids.len(), 1, "{resource}: {g:?}");
        sim.sim.empty_lists_on(&format!("GET /v3/{collection}"), 10);
        let rv = my_revoke("bob", role, resource, "ar-failed");
        let out = r.revoke(&rv).await.unwrap();
        sim.sim.clear_list_faults();
        assert_eq!(out.removed_binding_ids, g.binding_ids, "{resource}: {out:?}");
        assert!(!present(&sim, &g.binding_ids[0]), "{resource}");
    }
    sim.stop().await;
}

/// A create-user grant for a user whose live access already has its password keeps it (D9).
#[tokio::test]
async fn keep_password_leaves_a_live_accesss_password_working() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let mut first = grant_req("dana99", "cluster-member", "c-7x2k9");
    first.create_user = true;
    let g1 = r.grant(&first).await.unwrap();
    let password = g1.credentials.unwrap().password.expose_secret().to_string();
    let mut second = grant_req("dana99", "project-member", "c-7x2k9:p-abcde");
    second.create_user = true;
    second.keep_password = true;
    let g2 = r.grant(&second).await.unwrap();
    assert!(g2.credentials.is_none(), "{g2:?}");
    assert!(g2.note.as_deref().is_some_and(|n| n.contains("not reset")), "{g2:?}");
    assert!(
        sim.sim.check_password(&g1.user_id, &password),
        "the first password still works"
    );
    sim.stop().await;
}

/// The revoke of a created user's last access disables it, while a grant of another role for the
/// same user lands in the middle (lifecycle D8): whatever the interleaving, a user left with a
/// binding ends enabled. The disabling `PUT` is slowed so the grant runs while it is in flight.
#[tokio::test]
async fn a_grant_racing_the_disabling_revoke_leaves_the_user_enabled() {
    let sim = sim().await;
    let r = std::sync::Arc::new(rancher(&sim));
    admin_proven(&r).await;
    let enabled = |id: &str| sim.sim.users().into_iter().find(|u| u.id == id).map(|u| u.enabled);
    let mut a = grant_req("carol77", "cluster-member", "c-7x2k9");
    a.create_user = true;
    let ga = r.grant(&a).await.unwrap();
    let mut rv = revoke_req("carol77", "cluster-member", "c-7x2k9");
    rv.grant_id = Some("ar-a".into());
    rv.user_id = Some(ga.user_id.clone());
    rv.binding_ids = ga.binding_ids.clone();
    sim.sim
        .slow_next_on("PUT /v3/users/{id}", 1, Duration::from_millis(1500));
    let revoking = {
        let r = r.clone();
        tokio::spawn(async move { r.revoke(&rv).await })
    };
    // The revoke lists no access left and sends its PUT; the grant runs while the PUT waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sim.sim.stats().route("PUT /v3/users/{id}") == 0 {
        assert!(std::time::Instant::now() < deadline, "the revoke never sent its PUT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut b = grant_req("carol77", "project-member", "c-7x2k9:p-x4m7q");
    b.create_user = true;
    b.keep_password = true;
    let gb = r.grant(&b).await.unwrap();
    let out = revoking.await.unwrap().unwrap();
    assert!(!out.user_disabled, "a binding appeared: {out:?}");
    assert_eq!(enabled(&ga.user_id), Some(true), "B's access works");
    assert_eq!(
        matching(&sim, Some(&ga.user_id), "project-member", "c-7x2k9:p-x4m7q").len(),
        1
    );
    assert_eq!(gb.binding_ids.len(), 1);
    sim.stop().await;
}

/// An owner who is admin only through an identity-provider group, or only through a custom
/// global role with Rancher's admin rules, grants and revokes (lifecycle D2, rancher N10); one
/// who is no admin at all is refused before anything is written.
#[tokio::test]
async fn admin_through_a_group_or_a_custom_role_grants_and_revokes_and_a_non_admin_writes_nothing() {
    use crate::sim::PolicyRule;
    for how in ["group", "custom role", "none"] {
        let sim = sim().await;
        let owner = crate::sim::ADMIN_USER_ID;
        // The owner's own admin binding goes; then it is admin (if at all) only as `how` says.
        sim.sim.set_key_owner_admin(false);
        match how {
            "group" => {
                assert!(
                    sim.sim
                        .set_user_groups(owner, vec!["okta_group://rancher-admins".into()])
                );
                let mut grb = planted("grb-okta-admins", "admin", "global", owner);
                grb.user_id = None;
                grb.user_principal_id = None;
                grb.group_principal_id = Some("okta_group://rancher-admins".into());
                sim.sim.add_binding(grb).unwrap();
            }
            "custom role" => {
                sim.sim.add_global_role("gr-cloned-admin", PolicyRule::admin()).unwrap();
                sim.sim
                    .add_binding(planted("grb-cloned", "gr-cloned-admin", "global", owner))
                    .unwrap();
            }
            _ => {}
        }
        let r = rancher(&sim);
        let before = sim.sim.bindings().len();
        let req = my_grant("bob", "cluster-member", "c-7x2k9", "ar-1");
        let granted = r.grant(&req).await;
        if how == "none" {
            let e = granted.unwrap_err();
            assert!(matches!(e, IntegrationError::PermissionDenied { .. }), "{e:?}");
            assert_eq!(sim.sim.bindings().len(), before, "nothing was written");
            assert_eq!(sim.sim.stats().route("POST /v3/clusterroletemplatebindings"), 0);
            sim.stop().await;
            continue;
        }
        let g = granted.unwrap_or_else(|e| panic!("{how}: {e}"));
        let mut rv = my_revoke("bob", "cluster-member", "c-7x2k9", "ar-1");
        rv.binding_ids = g.binding_ids.clone();
        let out = r.revoke(&rv).await.unwrap_or_else(|e| panic!("{how}: {e}"));
        assert_eq!(out.removed_binding_ids, g.binding_ids, "{how}");
        assert!(
            matching(&sim, Some("u-bob01"), "cluster-member", "c-7x2k9").is_empty(),
            "{how}"
        );
        sim.stop().await;
    }
}

/// Expiry is judged on Rancher's clock (its `Date` header), not this machine's: with Rancher an
/// hour behind, a binding whose expiry passed here but not there is kept, and a grant whose expiry
/// passed here but not there is made; with Rancher ahead, the reverse (lifecycle D14).
#[tokio::test]
async fn expiry_is_judged_on_rancher_s_clock() {
    let sim = sim().await;
    let r = rancher(&sim);
    admin_proven(&r).await;
    let ten_min_ago = Utc::now() - chrono::Duration::minutes(10);
    let b = connector_binding(
        &me(),
        "cluster-member",
        "c-7x2k9",
        "u-bob01",
        Some("ar-1"),
        Some(ten_min_ago),
    );
    sim.sim.add_binding(b.clone()).unwrap();
    sim.sim.set_clock_offset(chrono::Duration::hours(-1));
    let out = r.sweep(&reconcile_with(Vec::new())).await.unwrap();
    assert!(out.removed.is_empty(), "not expired on Rancher's clock: {out:?}");
    assert!(present(&sim, &b.id));
    let mut req = grant_req("bob", "cluster-owner", "c-7x2k9");
    req.owner = Some(me());
    req.expires_at = Some(ten_min_ago);
    let g = r.grant(&req).await.unwrap();
    assert_eq!(g.binding_ids.len(), 1, "not expired on Rancher's clock");
    sim.sim.set_clock_offset(chrono::Duration::hours(1));
    let in_ten_min = Utc::now() + chrono::Duration::minutes(10);
    let mut late = grant_req("bob", "project-owner", "c-7x2k9:p-x4m7q");
    late.owner = Some(me());
    late.expires_at = Some(in_ten_min);
    let e = r.grant(&late).await.unwrap_err();
    assert!(e.to_string().contains("Rancher's clock"), "{e}");
    let out = r.sweep(&reconcile_with(Vec::new())).await.unwrap();
    assert!(out.removed.iter().any(|s| s.id == b.id), "{out:?}");
    sim.stop().await;
}
