//! Behaviour tests over HTTP against [`SimHandle::start`] (loopback, port 0). Each test names one
//! behaviour of the real Rancher API that the simulator must reproduce.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;

struct Client {
    h: SimHandle,
    http: reqwest::Client,
    auth: String,
}

impl Client {
    async fn start(options: SimOptions) -> Client {
        let h = SimHandle::start(options).await.expect("sim starts");
        let (a, s) = h.sim.api_key();
        Client {
            h,
            http: reqwest::Client::new(),
            auth: format!("Bearer {a}:{s}"),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.h.base_url)
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = rb.send().await.expect("request");
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path)).header("Authorization", &self.auth))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.http
                .post(self.url(path))
                .header("Authorization", &self.auth)
                .json(&body),
        )
        .await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            self.http
                .put(self.url(path))
                .header("Authorization", &self.auth)
                .json(&body),
        )
        .await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(self.url(path)).header("Authorization", &self.auth))
            .await
    }

    /// Every item of a collection, following `next`.
    async fn all(&self, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut url = self.url(path);
        loop {
            let (status, page) = self.get(&url).await;
            assert_eq!(status, 200, "{page}");
            out.extend(page["data"].as_array().cloned().unwrap_or_default());
            match page["pagination"]["next"].as_str() {
                Some(next) => url = next.to_string(),
                None => return out,
            }
        }
    }

    async fn ids(&self, path: &str) -> Vec<String> {
        self.all(path)
            .await
            .iter()
            .map(|o| o["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn stop(self) {
        self.h.stop().await;
    }
}

fn version(minor: u32) -> SimOptions {
    SimOptions {
        version: RancherVersion::new(minor),
        ..SimOptions::default()
    }
}

fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["type"], "error", "{}", answer.1);
    assert_eq!(answer.1["baseType"], "error", "{}", answer.1);
    assert_eq!(answer.1["status"], status, "numeric status: {}", answer.1);
    assert_eq!(answer.1["code"], code, "{}", answer.1);
}

fn crtb(user: &str, role: &str, cluster: &str) -> Value {
    json!({"clusterId": cluster, "roleTemplateId": role, "userId": user})
}

fn prtb(user: &str, role: &str, project: &str) -> Value {
    json!({"projectId": project, "roleTemplateId": role, "userId": user})
}

#[test]
fn base32_and_external_user_ids_match_rancher() {
    assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    assert_eq!(base32(b"fooba"), "MZXW6YTB");
    assert_eq!(base32(b"f"), "MY");
    let id = external_user_id("github_user://4242");
    assert!(id.starts_with("u-") && id.len() == 12, "{id}");
    assert_eq!(id, id.to_lowercase());
    assert_eq!(id, external_user_id("github_user://4242"), "deterministic");
    assert_ne!(id, external_user_id("github_user://4243"));
}

#[test]
fn options_parse_and_print() {
    assert_eq!("large".parse::<DatasetSize>(), Ok(DatasetSize::Large));
    assert_eq!("Small".parse::<DatasetSize>(), Ok(DatasetSize::Small));
    assert!("huge".parse::<DatasetSize>().is_err());
    assert_eq!(DatasetSize::Large.to_string(), "large");
    assert_eq!("v2.14.1".parse::<RancherVersion>(), Ok(RancherVersion::new(14)));
    assert_eq!("2.9".parse::<RancherVersion>(), Ok(RancherVersion::new(9)));
    assert!("3.1".parse::<RancherVersion>().is_err());
    assert_eq!(RancherVersion::default().to_string(), "2.13");
    assert!(
        !format!("{:?}", SimOptions::default()).contains(DEFAULT_SECRET_KEY),
        "secret redacted in Debug"
    );
}

#[tokio::test]
async fn auth_failures_answer_401_with_a_string_status_and_no_code() {
    let c = Client::start(SimOptions::default()).await;
    let expected = json!({"type": "error", "status": "401", "message": "Unauthorized 401: must authenticate"});
    let none = c.send(c.http.get(c.url("/v3/clusters"))).await;
    assert_eq!(none, (401, expected.clone()));
    let wrong = c
        .send(
            c.http
                .get(c.url("/v3"))
                .header("Authorization", "Bearer token-sim01:nope"),
        )
        .await;
    assert_eq!(wrong, (401, expected.clone()));

    // Bearer with the ext/ prefix, and Basic, both authenticate.
    let ext = format!("Bearer ext/{DEFAULT_ACCESS_KEY}:{DEFAULT_SECRET_KEY}");
    assert_eq!(
        c.send(c.http.get(c.url("/v3")).header("Authorization", ext)).await.0,
        200
    );
    let basic = c
        .http
        .get(c.url("/v3/users?me=true"))
        .basic_auth(DEFAULT_ACCESS_KEY, Some(DEFAULT_SECRET_KEY));
    let (status, me) = c.send(basic).await;
    assert_eq!(status, 200);
    assert_eq!(me["data"][0]["id"], ADMIN_USER_ID);
    assert_eq!(c.get("/v3").await.1["type"], "apiRoot");

    // Rotation: the old key now gets 401, the new one works.
    c.h.sim.set_api_key("token-new02", "n3wsecret");
    assert_eq!(c.get("/v3/clusters").await, (401, expected));
    let new = c
        .http
        .get(c.url("/v3/clusters"))
        .header("Authorization", "Bearer token-new02:n3wsecret");
    assert_eq!(c.send(new).await.0, 200);
    assert_eq!(c.h.sim.api_key(), ("token-new02".to_string(), "n3wsecret".to_string()));
    c.stop().await;
}

#[tokio::test]
async fn an_expired_key_or_a_disabled_owner_gets_401() {
    let c = Client::start(SimOptions::default()).await;
    c.h.sim.set_key_expiry(Some(Utc::now() - chrono::Duration::seconds(5)));
    assert_eq!(c.get("/v3/clusters").await.0, 401);
    c.h.sim.set_key_expiry(Some(Utc::now() + chrono::Duration::hours(1)));
    let (status, token) = c.get(&format!("/v3/tokens/{DEFAULT_ACCESS_KEY}")).await;
    assert_eq!(status, 200);
    assert_eq!(token["expired"], false);
    assert!(token["expiresAt"].as_str().is_some_and(|s| !s.is_empty()), "{token}");
    assert!(token["ttl"].as_i64().is_some_and(|t| t > 0), "{token}");
    // Deactivating yourself is refused.
    let answer = c
        .put(&format!("/v3/users/{ADMIN_USER_ID}"), json!({"enabled": false}))
        .await;
    assert_error(&answer, 422, "InvalidAction");
    c.stop().await;
}

#[tokio::test]
async fn tokens_endpoint_and_a_cluster_scoped_key() {
    let c = Client::start(SimOptions::default()).await;
    let (status, token) = c.get(&format!("/v3/tokens/{DEFAULT_ACCESS_KEY}")).await;
    assert_eq!(status, 200);
    assert_eq!(token["id"], DEFAULT_ACCESS_KEY);
    assert_eq!(token["userId"], ADMIN_USER_ID);
    assert_eq!(token["clusterId"], Value::Null);
    assert_eq!(token["expiresAt"], "");
    assert_eq!(token["expired"], false);
    assert_eq!(token["enabled"], true);
    assert_error(&c.get("/v3/tokens/token-other").await, 404, "NotFound");

    c.h.sim.set_key_scope(Some("c-7x2k9"));
    let (status, token) = c.get(&format!("/v3/tokens/{DEFAULT_ACCESS_KEY}")).await;
    assert_eq!(status, 401, "a scoped key fails outside its cluster: {token}");
    assert_eq!(token["status"], "401");
    assert!(
        token["message"]
            .as_str()
            .unwrap_or_default()
            .contains("clusterID does not match"),
        "{token}"
    );
    assert_eq!(c.get("/v3/clusters/c-7x2k9").await.0, 200);
    assert_eq!(c.get("/v3/cluster/c-7x2k9/namespaces").await.0, 200);
    assert_eq!(c.get("/v3/clusters/local").await.0, 401);
    assert_eq!(c.get("/v3/users").await.0, 401);
    c.h.sim.set_key_scope(None);

    let scoped = Client::start(SimOptions {
        key_cluster_id: Some("local".into()),
        ..SimOptions::default()
    })
    .await;
    assert_eq!(scoped.get("/v3/clusters/local").await.0, 200);
    assert_eq!(scoped.get("/v3/clusters").await.0, 401);
    scoped.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn the_small_dataset_has_the_documented_ids() {
    let c = Client::start(SimOptions::default()).await;
    assert_eq!(c.ids("/v3/clusters").await, ["c-7x2k9", "c-m-4bq8z2lp", "local"]);
    let projects = c.ids("/v3/projects").await;
    for p in [
        "local:p-8kq2w",
        "local:p-tz5mn",
        "c-7x2k9:p-abcde",
        "c-7x2k9:p-x4m7q",
        "c-m-4bq8z2lp:p-h6v9r",
    ] {
        assert!(projects.contains(&p.to_string()), "{p}");
    }
    let mut namespaces = 0;
    for cl in ["local", "c-7x2k9", "c-m-4bq8z2lp"] {
        let ns = c.all(&format!("/v3/cluster/{cl}/namespaces")).await;
        assert!(
            ns.iter().any(|n| n["projectId"].is_null()),
            "{cl} has a namespace in no project"
        );
        namespaces += ns.len();
    }
    assert!(namespaces >= 9);
    let roles = c.ids("/v3/globalroles").await;
    for r in ["admin", "user", "user-base", "restricted-admin"] {
        assert!(roles.contains(&r.to_string()), "{r}");
    }
    let (_, lock1) = c.get("/v3/roletemplates/rt-lock1").await;
    assert_eq!(
        (lock1["context"].clone(), lock1["locked"].clone()),
        (json!("cluster"), json!(true))
    );
    let users = c.all("/v3/users").await;
    let octo = external_user_id("github_user://4242");
    let ext = users.iter().find(|u| u["id"] == octo.as_str()).expect("external user");
    assert!(ext.get("username").is_none_or(Value::is_null), "{ext}");
    assert_eq!(ext["principalIds"], json!(["github_user://4242"]));
    let alice = users.iter().find(|u| u["username"] == "alice").expect("alice");
    assert_eq!(alice["principalIds"], json!(["local://u-alice1"]));
    assert!(users.iter().all(|u| u.get("password").is_none()), "never a password");
    let bindings = c.h.sim.bindings();
    assert_eq!(bindings.len(), 6);
    let has = |u: &str, role: &str, res: &str| {
        bindings
            .iter()
            .any(|b| b.user_id.as_deref() == Some(u) && b.role_id == role && b.resource_id == res)
    };
    assert!(has("u-bob01", "project-member", "c-7x2k9:p-abcde"));
    assert!(!has("u-bob01", "cluster-member", "c-7x2k9"));
    assert!(!has("u-alice1", "cluster-member", "c-7x2k9") && !has("u-alice1", "cluster-owner", "c-7x2k9"));
    let (_, grp) = c.get("/v3/clusterroletemplatebindings/c-7x2k9:crtb-grp01").await;
    assert_eq!(grp["groupPrincipalId"], "github_team://777");
    assert_eq!(grp["status"]["summary"], "Completed");
    let (_, payments) = c.get("/v3/projects/c-7x2k9:p-x4m7q").await;
    assert_eq!(payments["backingNamespace"], "c-7x2k9-p-x4m7q");
    assert_eq!(payments["clusterId"], "c-7x2k9");
    c.stop().await;
}

#[tokio::test]
async fn pagination_follows_next_across_pages_and_reports_partial() {
    let c = Client::start(SimOptions::default()).await;
    let all: Vec<String> = c.h.sim.users().into_iter().map(|u| u.id).collect();
    let (_, first) = c.get("/v3/users?limit=2").await;
    assert_eq!(first["pagination"]["limit"], 2);
    assert_eq!(first["pagination"]["total"], all.len());
    assert_eq!(first["pagination"]["partial"], true);
    let next = first["pagination"]["next"].as_str().expect("next");
    assert!(
        next.starts_with(&c.h.base_url) && next.contains(&format!("marker={}", all[2])),
        "{next}"
    );
    assert_eq!(c.ids("/v3/users?limit=2").await, all, "every user once, in id order");
    let (_, last) = c.get(next).await;
    assert!(
        last["pagination"].get("next").is_none(),
        "last page has no next: {last}"
    );
    assert_eq!(
        last["pagination"]["partial"], true,
        "Norman: partial stays true on the last page"
    );
    let (_, whole) = c.get("/v3/users").await;
    assert_eq!(whole["pagination"]["limit"], 1000);
    assert!(whole["pagination"].get("partial").is_none(), "omitted when false");
    assert_eq!(c.get("/v3/users?limit=-1").await.1["pagination"]["limit"], 10_000);
    assert_eq!(c.get("/v3/users?limit=50000").await.1["pagination"]["limit"], 10_000);
    // sort= and order=desc on a filterable field
    assert_eq!(
        c.ids("/v3/clusters?sort=name&order=desc").await,
        ["c-m-4bq8z2lp", "c-7x2k9", "local"]
    );
    c.stop().await;
}

#[tokio::test]
async fn a_marker_that_no_longer_exists_restarts_paging_at_item_zero() {
    let c = Client::start(SimOptions::default()).await;
    let (_, first) = c.get("/v3/globalrolebindings?limit=1").await;
    assert_eq!(first["data"][0]["id"], "grb-admin");
    let next = first["pagination"]["next"].as_str().expect("next").to_string();
    assert!(next.contains("marker=grb-al1ce"), "{next}");
    assert!(c.h.sim.remove_binding("grb-al1ce"));
    let (status, again) = c.get(&next).await;
    assert_eq!(status, 200);
    assert_eq!(again["data"][0]["id"], "grb-admin", "silently back at item 0: {again}");
    c.stop().await;
}

#[tokio::test]
async fn unknown_filters_and_modifiers_are_silently_ignored() {
    let c = Client::start(SimOptions::default()).await;
    let projects = c.ids("/v3/projects").await.len();
    assert_eq!(projects, 6);
    assert_eq!(
        c.ids("/v3/projects?ClusterID=c-7x2k9").await.len(),
        projects,
        "wrong case"
    );
    assert_eq!(
        c.ids("/v3/projects?clusterId_gt=c-7x2k9").await.len(),
        projects,
        "unknown modifier"
    );
    let users = c.h.sim.users().len();
    assert_eq!(
        c.ids("/v3/users?name=Alice%20Example").await.len(),
        users,
        "name is not filterable on users"
    );
    assert_eq!(
        c.ids("/v3/users?principalIds=local://u-alice1").await.len(),
        users,
        "arrays are not filterable"
    );
    let (_, page) = c.get("/v3/users?bogus=1&username=alice").await;
    assert_eq!(page["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["filters"]["username"][0]["value"], "alice");
    c.stop().await;
}

#[tokio::test]
async fn known_filters_apply() {
    let c = Client::start(SimOptions::default()).await;
    assert_eq!(
        c.ids("/v3/projects?clusterId=c-7x2k9").await,
        ["c-7x2k9:p-abcde", "c-7x2k9:p-x4m7q"]
    );
    assert_eq!(c.ids("/v3/clusters?name=prod-eu").await, ["c-7x2k9"]);
    assert_eq!(c.ids("/v3/clusters?id_ne=local").await, ["c-7x2k9", "c-m-4bq8z2lp"]);
    assert_eq!(c.ids("/v3/users?username=bob").await, ["u-bob01"]);
    assert_eq!(c.ids("/v3/users?me=true").await, [ADMIN_USER_ID]);
    assert_eq!(
        c.ids("/v3/roletemplates?context=cluster&locked=false&hidden=false")
            .await,
        ["cluster-member", "cluster-owner", "nodes-view"]
    );
    assert_eq!(
        c.ids("/v3/cluster/c-7x2k9/namespaces?projectId=c-7x2k9:p-x4m7q").await,
        ["payments-api", "payments-db"]
    );
    assert_eq!(
        c.ids("/v3/clusterroletemplatebindings?clusterId=c-7x2k9&groupPrincipalId=github_team://777")
            .await,
        ["c-7x2k9:crtb-grp01"]
    );
    assert_eq!(
        c.ids("/v3/projectroletemplatebindings?userId=u-bob01").await,
        ["p-abcde:prtb-b0b01"]
    );
    assert_eq!(
        c.ids("/v3/globalrolebindings?globalRoleId=user&userId_in=u-alice1&userId_in=u-bob01")
            .await,
        ["grb-al1ce", "grb-b0b01"]
    );
    c.stop().await;
}

#[tokio::test]
async fn a_repeated_binding_name_is_409_already_exists_on_every_version() {
    for minor in [10, 13, 15] {
        let c = Client::start(version(minor)).await;
        let mut body = crtb("u-bob01", "cluster-member", "c-7x2k9");
        body["name"] = json!("crtb-bob-member");
        let (status, created) = c.post("/v3/clusterroletemplatebindings", body.clone()).await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["id"], "c-7x2k9:crtb-bob-member");
        let again = c.post("/v3/clusterroletemplatebindings", body).await;
        assert_error(&again, 409, "AlreadyExists");
        assert!(
            again.1["message"]
                .as_str()
                .unwrap_or_default()
                .contains("\"crtb-bob-member\" already exists")
        );
        let mut grb = json!({"globalRoleId": "user-base", "userId": "u-bob01", "name": "grb-fixed"});
        assert_eq!(c.post("/v3/globalrolebindings", grb.clone()).await.0, 201);
        assert_error(
            &c.post("/v3/globalrolebindings", grb.clone()).await,
            409,
            "AlreadyExists",
        );
        grb["name"] = json!("Not_A_Name");
        assert_error(&c.post("/v3/globalrolebindings", grb).await, 422, "Invalid");
        c.stop().await;
    }
}

#[tokio::test]
async fn duplicate_bindings_follow_the_version() {
    // 2.13: CRTB and PRTB duplicates are created.
    let c = Client::start(version(13)).await;
    for _ in 0..2 {
        assert_eq!(
            c.post(
                "/v3/clusterroletemplatebindings",
                crtb("u-bob01", "cluster-member", "c-7x2k9")
            )
            .await
            .0,
            201
        );
        assert_eq!(
            c.post(
                "/v3/projectroletemplatebindings",
                prtb("u-alice1", "read-only", "local:p-8kq2w")
            )
            .await
            .0,
            201
        );
    }
    assert_eq!(
        c.ids("/v3/clusterroletemplatebindings?userId=u-bob01&clusterId=c-7x2k9")
            .await
            .len(),
        2
    );
    c.stop().await;

    // 2.14: CRTB duplicates refused by the webhook, PRTB duplicates still created.
    let c = Client::start(version(14)).await;
    assert_eq!(
        c.post(
            "/v3/clusterroletemplatebindings",
            crtb("u-bob01", "cluster-member", "c-7x2k9")
        )
        .await
        .0,
        201
    );
    let dup = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-bob01", "cluster-member", "c-7x2k9"),
        )
        .await;
    assert_error(&dup, 409, "Conflict");
    assert_eq!(
        dup.1["message"],
        "admission webhook \"rancher.cattle.io.clusterroletemplatebindings.management.cattle.io\" denied the \
         request: duplicate crtb not allowed"
    );
    // Same subject by principal is also a duplicate; another role is not.
    let by_principal =
        json!({"clusterId": "c-7x2k9", "roleTemplateId": "cluster-member", "userPrincipalId": "local://u-bob01"});
    assert_error(
        &c.post("/v3/clusterroletemplatebindings", by_principal).await,
        409,
        "Conflict",
    );
    assert_eq!(
        c.post(
            "/v3/clusterroletemplatebindings",
            crtb("u-bob01", "nodes-view", "c-7x2k9")
        )
        .await
        .0,
        201
    );
    for _ in 0..2 {
        assert_eq!(
            c.post(
                "/v3/projectroletemplatebindings",
                prtb("u-alice1", "read-only", "local:p-8kq2w")
            )
            .await
            .0,
            201
        );
    }
    c.stop().await;

    // 2.15: PRTB duplicates refused too; GRB duplicates never.
    let c = Client::start(version(15)).await;
    assert_eq!(
        c.post(
            "/v3/projectroletemplatebindings",
            prtb("u-alice1", "read-only", "local:p-8kq2w")
        )
        .await
        .0,
        201
    );
    let dup = c
        .post(
            "/v3/projectroletemplatebindings",
            prtb("u-alice1", "read-only", "local:p-8kq2w"),
        )
        .await;
    assert_error(&dup, 409, "Conflict");
    assert!(
        dup.1["message"]
            .as_str()
            .unwrap_or_default()
            .ends_with("duplicate prtb not allowed")
    );
    for _ in 0..2 {
        let grb = json!({"globalRoleId": "user", "userId": "u-alice1"});
        assert_eq!(c.post("/v3/globalrolebindings", grb).await.0, 201);
    }
    assert_eq!(
        c.ids("/v3/globalrolebindings?userId=u-alice1&globalRoleId=user")
            .await
            .len(),
        3
    );
    c.stop().await;
}

#[tokio::test]
async fn prtb_ids_use_the_project_namespace_in_both_forms() {
    let c = Client::start(SimOptions::default()).await;
    let (status, old) = c
        .post(
            "/v3/projectroletemplatebindings",
            prtb("u-alice1", "project-member", "c-7x2k9:p-abcde"),
        )
        .await;
    assert_eq!(status, 201, "{old}");
    let old_id = old["id"].as_str().unwrap_or_default();
    assert!(
        old_id.starts_with("p-abcde:prtb-") && old_id.len() == "p-abcde:prtb-".len() + 5,
        "{old_id}"
    );
    assert_eq!(old["projectId"], "c-7x2k9:p-abcde");
    let (_, new) = c
        .post(
            "/v3/projectroletemplatebindings",
            prtb("u-alice1", "project-member", "c-7x2k9:p-x4m7q"),
        )
        .await;
    let new_id = new["id"].as_str().unwrap_or_default();
    assert!(new_id.starts_with("c-7x2k9-p-x4m7q:prtb-"), "{new_id}");
    assert_eq!(new["name"], new_id.split_once(':').map(|(_, n)| n).unwrap_or_default());
    assert_eq!(
        c.get(&format!("/v3/projectroletemplatebindings/{new_id}")).await.1["id"],
        new_id
    );
    // A CRTB id is <cluster>:crtb-xxxxx.
    let (_, b) = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-alice1", "cluster-member", "c-m-4bq8z2lp"),
        )
        .await;
    assert!(
        b["id"].as_str().unwrap_or_default().starts_with("c-m-4bq8z2lp:crtb-"),
        "{b}"
    );
    assert_eq!(b["userPrincipalId"], "local://u-alice1", "filled in from the user");
    // Before 2.12 there is no backingNamespace and every project uses p-y.
    let old_version = Client::start(version(11)).await;
    let (_, p) = old_version.get("/v3/projects/c-7x2k9:p-x4m7q").await;
    assert!(p.get("backingNamespace").is_none(), "{p}");
    c.stop().await;
    old_version.stop().await;
}

#[tokio::test]
async fn a_binding_by_user_principal_ensures_the_user() {
    let c = Client::start(SimOptions::default()).await;
    let principal = "github_user://5151";
    let body = json!({"clusterId": "c-7x2k9", "roleTemplateId": "cluster-member", "userPrincipalId": principal});
    let (status, b) = c.post("/v3/clusterroletemplatebindings", body).await;
    assert_eq!(status, 201, "{b}");
    let uid = external_user_id(principal);
    assert_eq!(b["userId"], uid.as_str());
    assert_eq!(b["userPrincipalId"], principal);
    let (status, user) = c.get(&format!("/v3/users/{uid}")).await;
    assert_eq!(status, 200);
    assert_eq!(user["principalIds"], json!([principal]));
    assert_eq!(user["name"], "Hubot Robot");
    // A second binding reuses the user.
    let body = json!({"projectId": "c-7x2k9:p-abcde", "roleTemplateId": "read-only", "userPrincipalId": principal});
    assert_eq!(
        c.post("/v3/projectroletemplatebindings", body).await.1["userId"],
        uid.as_str()
    );
    assert_eq!(
        c.h.sim
            .users()
            .iter()
            .filter(|u| u.principal_ids == [principal])
            .count(),
        1
    );
    // local://u-x resolves to the existing user; a missing local user is an invalid reference.
    let body = json!({"clusterId": "local", "roleTemplateId": "cluster-member", "userPrincipalId": "local://u-bob01"});
    assert_eq!(
        c.post("/v3/clusterroletemplatebindings", body).await.1["userId"],
        "u-bob01"
    );
    let body = json!({"clusterId": "local", "roleTemplateId": "cluster-member", "userPrincipalId": "local://u-nope"});
    assert_error(
        &c.post("/v3/clusterroletemplatebindings", body).await,
        422,
        "InvalidReference",
    );
    c.stop().await;

    // A key whose provider cannot resolve external principals: 500, as with a local admin's key.
    let local_only = Client::start(SimOptions {
        resolve_external_principals: false,
        ..SimOptions::default()
    })
    .await;
    let body =
        json!({"clusterId": "local", "roleTemplateId": "cluster-member", "userPrincipalId": "github_user://999"});
    assert_error(
        &local_only.post("/v3/clusterroletemplatebindings", body).await,
        500,
        "ServerError",
    );
    local_only.stop().await;
}

#[tokio::test]
async fn a_grb_by_user_principal_alone_is_422() {
    let c = Client::start(SimOptions::default()).await;
    let body = json!({"globalRoleId": "user", "userPrincipalId": "local://u-bob01"});
    let answer = c.post("/v3/globalrolebindings", body).await;
    assert_error(&answer, 422, "InvalidBodyContent");
    let group = json!({"globalRoleId": "user-base", "groupPrincipalId": "github_team://888"});
    let (status, g) = c.post("/v3/globalrolebindings", group).await;
    assert_eq!(status, 201);
    assert!(g["id"].as_str().unwrap_or_default().starts_with("grb-"), "{g}");
    assert_error(
        &c.post(
            "/v3/globalrolebindings",
            json!({"globalRoleId": "nope", "userId": "u-bob01"}),
        )
        .await,
        422,
        "InvalidReference",
    );
    c.stop().await;
}

#[tokio::test]
async fn bad_bindings_get_the_rancher_422s() {
    let c = Client::start(SimOptions::default()).await;
    let post = |body: Value| c.post("/v3/clusterroletemplatebindings", body);
    let locked = post(crtb("u-bob01", "rt-lock1", "c-7x2k9")).await;
    assert_error(&locked, 422, "InvalidState");
    assert_eq!(locked.1["message"], "Role is locked and cannot be assigned");
    let context = post(crtb("u-bob01", "project-member", "c-7x2k9")).await;
    assert_error(&context, 422, "InvalidBodyContent");
    assert_eq!(
        context.1["message"],
        "Cannot reference context [project] from [cluster] context"
    );
    let context = c
        .post(
            "/v3/projectroletemplatebindings",
            prtb("u-bob01", "cluster-member", "local:p-8kq2w"),
        )
        .await;
    assert_eq!(
        context.1["message"],
        "Cannot reference context [cluster] from [project] context"
    );
    let unknown = post(crtb("u-bob01", "no-such-role", "c-7x2k9")).await;
    assert_error(&unknown, 422, "InvalidReference");
    assert!(
        unknown.1["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-role")
    );
    assert_error(
        &post(crtb("u-bob01", "cluster-member", "c-nope")).await,
        422,
        "InvalidReference",
    );
    assert_error(
        &post(crtb("u-nobody", "cluster-member", "c-7x2k9")).await,
        422,
        "InvalidReference",
    );
    assert_error(
        &c.post(
            "/v3/projectroletemplatebindings",
            prtb("u-bob01", "read-only", "c-7x2k9:p-nope"),
        )
        .await,
        422,
        "InvalidReference",
    );
    let none = post(json!({"clusterId": "c-7x2k9", "roleTemplateId": "cluster-member"})).await;
    assert_error(&none, 422, "InvalidBodyContent");
    assert_eq!(
        none.1["message"],
        "must target a user [userId]/[userPrincipalId] OR a group [groupId]/[groupPrincipalId]"
    );
    let both = post(json!({"clusterId": "c-7x2k9", "roleTemplateId": "cluster-member", "userId": "u-bob01", "groupPrincipalId": "github_team://777"})).await;
    assert_error(&both, 422, "InvalidBodyContent");
    assert_error(
        &post(json!({"clusterId": "c-7x2k9", "roleTemplateId": 7, "userId": "u-bob01"})).await,
        422,
        "InvalidType",
    );
    let bad_json = c
        .send(
            c.http
                .post(c.url("/v3/clusterroletemplatebindings"))
                .header("Authorization", &c.auth)
                .body("{nope"),
        )
        .await;
    assert_error(&bad_json, 422, "InvalidBodyContent");
    assert_eq!(c.h.sim.bindings().len(), 6, "nothing was created");
    c.stop().await;
}

#[tokio::test]
async fn deleting_a_binding_answers_200_then_404() {
    let c = Client::start(SimOptions::default()).await;
    let (status, gone) = c.delete("/v3/projectroletemplatebindings/p-abcde:prtb-b0b01").await;
    assert_eq!(status, 200);
    assert_eq!(gone["id"], "p-abcde:prtb-b0b01");
    assert_error(
        &c.delete("/v3/projectroletemplatebindings/p-abcde:prtb-b0b01").await,
        404,
        "NotFound",
    );
    assert_error(
        &c.get("/v3/projectroletemplatebindings/p-abcde:prtb-b0b01").await,
        404,
        "NotFound",
    );
    assert_error(&c.put("/v3/clusters/local", json!({})).await, 405, "MethodNotAllow");
    assert_error(&c.get("/v3/nonsense").await, 404, "NotFound");
    c.stop().await;
}

#[tokio::test]
async fn users_are_created_with_the_password_rules_and_no_default_binding() {
    let c = Client::start(SimOptions::default()).await;
    let short = c
        .post(
            "/v3/users",
            json!({"username": "carol", "password": "short", "name": "Carol"}),
        )
        .await;
    assert_error(&short, 422, "InvalidBodyContent");
    assert_eq!(short.1["message"], "Password must be at least 12 characters");
    let taken = c
        .post(
            "/v3/users",
            json!({"username": "alice", "password": "long-enough-pw-1"}),
        )
        .await;
    assert_error(&taken, 422, "NotUnique");
    assert_eq!(taken.1["fieldName"], "username");
    assert_eq!(taken.1["message"], "Username is already in use.");

    let body = json!({"username": "carol", "password": "long-enough-pw-1", "name": "Carol", "mustChangePassword": true,
        "description": "made by apono", "labels": {"apono.io/managed": "true"}});
    let (status, carol) = c.post("/v3/users", body).await;
    assert_eq!(status, 201, "{carol}");
    let id = carol["id"].as_str().unwrap_or_default().to_string();
    assert!(id.starts_with("u-") && id.len() == 7, "{id}");
    assert_eq!(carol["principalIds"], json!([format!("local://{id}")]));
    assert_eq!(carol["labels"]["apono.io/managed"], "true");
    assert_eq!(carol["description"], "made by apono");
    assert_eq!(carol["mustChangePassword"], true);
    assert!(carol.get("password").is_none());
    assert!(
        c.ids(&format!("/v3/globalrolebindings?userId={id}")).await.is_empty(),
        "no default GRB"
    );
    assert!(c.h.sim.check_password(&id, "long-enough-pw-1"));

    let path = format!("/v3/users/{id}?action=setpassword");
    assert_error(
        &c.post(&path, json!({"newPassword": "tiny"})).await,
        422,
        "InvalidBodyContent",
    );
    let (status, after) = c.post(&path, json!({"newPassword": "another-long-pw-2"})).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["id"], id.as_str());
    assert_eq!(after["mustChangePassword"], false);
    assert!(c.h.sim.check_password(&id, "another-long-pw-2"));
    let (_, updated) = c
        .put(
            &format!("/v3/users/{id}"),
            json!({"mustChangePassword": true, "enabled": false}),
        )
        .await;
    assert_eq!(
        (updated["mustChangePassword"].clone(), updated["enabled"].clone()),
        (json!(true), json!(false))
    );
    assert!(
        !format!("{:?}", c.h.sim.users()).contains("another-long-pw-2"),
        "no password in Debug"
    );
    c.stop().await;
}

#[tokio::test]
async fn deleting_a_user_removes_its_bindings() {
    let c = Client::start(SimOptions::default()).await;
    assert_eq!(
        c.post(
            "/v3/clusterroletemplatebindings",
            crtb("u-bob01", "cluster-member", "c-7x2k9")
        )
        .await
        .0,
        201
    );
    assert_eq!(
        c.h.sim
            .bindings()
            .iter()
            .filter(|b| b.user_id.as_deref() == Some("u-bob01"))
            .count(),
        3
    );
    let (status, gone) = c.delete("/v3/users/u-bob01").await;
    assert_eq!(status, 200);
    assert_eq!(gone["username"], "bob");
    assert!(
        c.h.sim
            .bindings()
            .iter()
            .all(|b| b.user_id.as_deref() != Some("u-bob01"))
    );
    assert_error(&c.get("/v3/users/u-bob01").await, 404, "NotFound");
    assert_error(
        &c.delete(&format!("/v3/users/{ADMIN_USER_ID}")).await,
        422,
        "InvalidAction",
    );
    c.stop().await;
}

#[tokio::test]
async fn principals_are_listed_looked_up_and_searched() {
    let c = Client::start(SimOptions::default()).await;
    let (_, mine) = c.get("/v3/principals").await;
    assert_eq!(mine["data"][0]["id"], format!("local://{ADMIN_USER_ID}"));
    assert_eq!(mine["data"][0]["me"], true);
    let (status, alice) = c.get("/v3/principals/local:%2F%2Fu-alice1").await;
    assert_eq!(status, 200, "{alice}");
    assert_eq!(
        (alice["loginName"].clone(), alice["principalType"].clone()),
        (json!("alice"), json!("user"))
    );
    let (_, team) = c.get("/v3/principals/github_team:%2F%2F777").await;
    assert_eq!(team["principalType"], "group");
    assert_eq!(team["provider"], "github");
    assert_eq!(
        c.get("/v3/principals/local://u-alice1").await.0,
        404,
        "slashes must be encoded"
    );
    let (_, found) = c
        .post(
            "/v3/principals?action=search",
            json!({"name": "ali", "principalType": "user"}),
        )
        .await;
    let ids: Vec<&str> = found["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["local://u-alice1"]);
    let (_, groups) = c
        .post(
            "/v3/principals?action=search",
            json!({"name": "platform", "principalType": "group"}),
        )
        .await;
    assert_eq!(groups["data"][0]["id"], "github_team://777");
    let (_, octo) = c.post("/v3/principals?action=search", json!({"name": "octo"})).await;
    assert_eq!(octo["data"][0]["id"], "github_user://4242");
    c.stop().await;
}

#[tokio::test]
async fn fail_next_after_commit_applies_the_post_but_answers_500() {
    let c = Client::start(SimOptions::default()).await;
    let mut body = crtb("u-bob01", "cluster-member", "c-7x2k9");
    body["name"] = json!("crtb-retry-me");
    c.h.sim.fail_next(1, 500, true);
    let answer = c.post("/v3/clusterroletemplatebindings", body.clone()).await;
    assert_error(&answer, 500, "ServerError");
    assert_eq!(
        c.h.sim
            .bindings()
            .iter()
            .filter(|b| b.id == "c-7x2k9:crtb-retry-me")
            .count(),
        1,
        "applied"
    );
    // The client's retry with the same name learns it is done.
    assert_error(
        &c.post("/v3/clusterroletemplatebindings", body).await,
        409,
        "AlreadyExists",
    );

    // Before commit: nothing happens. 503 is ClusterUnavailable. Route-scoped faults wait for their route.
    c.h.sim.fail_next(1, 503, false);
    let answer = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-alice1", "nodes-view", "c-7x2k9"),
        )
        .await;
    assert_error(&answer, 503, "ClusterUnavailable");
    assert!(c.h.sim.bindings().iter().all(|b| b.role_id != "nodes-view"));
    c.h.sim
        .fail_next_on("DELETE /v3/projectroletemplatebindings/{id}", 2, 500, false);
    assert_eq!(c.get("/v3/clusters").await.0, 200);
    assert_eq!(
        c.delete("/v3/projectroletemplatebindings/p-abcde:prtb-b0b01").await.0,
        500
    );
    assert_eq!(
        c.delete("/v3/projectroletemplatebindings/p-abcde:prtb-b0b01").await.0,
        500
    );
    assert_eq!(
        c.delete("/v3/projectroletemplatebindings/p-abcde:prtb-b0b01").await.0,
        200
    );
    assert_eq!(c.h.sim.stats().injected_faults, 4);
    c.stop().await;
}

#[tokio::test]
async fn random_faults_are_seeded_and_deterministic() {
    let faults = FaultOptions {
        error_rate: 0.3,
        slow_rate: 0.0,
        seed: 42,
        ..FaultOptions::default()
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let c = Client::start(SimOptions {
            faults: faults.clone(),
            ..SimOptions::default()
        })
        .await;
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(c.get("/v3/clusters").await.0);
        }
        c.stop().await;
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1], "same seed, same faults");
    let errors = runs[0].iter().filter(|s| **s >= 500).count();
    assert!((4..=22).contains(&errors), "about 30% of 40: {errors}");
    assert!(runs[0].iter().all(|s| [200, 500, 503].contains(s)));
}

#[tokio::test]
async fn latency_and_slow_faults_delay_v3_answers_only() {
    let c = Client::start(SimOptions {
        latency: Duration::from_millis(150),
        ..SimOptions::default()
    })
    .await;
    let t = Instant::now();
    let (a, b) = tokio::join!(c.get("/v3/clusters"), c.get("/v3/users"));
    assert_eq!((a.0, b.0), (200, 200));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(290),
        "concurrent: {took:?}"
    );
    let t = Instant::now();
    reqwest::get(c.url("/sim/stats")).await.expect("stats");
    assert!(t.elapsed() < Duration::from_millis(150), "/sim is not delayed");
    c.h.sim.set_latency(Duration::ZERO);
    c.h.sim.set_faults(FaultOptions {
        slow_rate: 1.0,
        slow_delay: Duration::from_millis(120),
        ..FaultOptions::default()
    });
    let t = Instant::now();
    assert_eq!(c.get("/v3/clusters").await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(120));
    c.stop().await;
}

#[tokio::test]
async fn stats_count_v3_requests_per_route() {
    let c = Client::start(SimOptions::default()).await;
    c.get("/v3/users?limit=2").await;
    c.get("/v3/users/u-alice1").await;
    c.get("/v3/cluster/local/namespaces").await;
    c.post(
        "/v3/users/u-alice1?action=setpassword",
        json!({"newPassword": "a-new-long-password"}),
    )
    .await;
    c.send(c.http.get(c.url("/v3/clusters"))).await; // 401, still counted
    reqwest::get(c.url("/sim/bindings")).await.expect("sim bindings");
    let stats = c.h.sim.stats();
    assert_eq!(stats.total, 5, "{stats:?}");
    assert_eq!(stats.route("GET /v3/users"), 1);
    assert_eq!(stats.route("GET /v3/users/{id}"), 1);
    assert_eq!(stats.route("GET /v3/cluster/{id}/namespaces"), 1);
    assert_eq!(stats.route("POST /v3/users/{id}?action=setpassword"), 1);
    assert_eq!(stats.errors, 1);
    let over_http: SimStats = reqwest::get(c.url("/sim/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(over_http, stats);
    let users: Vec<SimUser> = reqwest::get(c.url("/sim/users"))
        .await
        .expect("users")
        .json()
        .await
        .expect("json");
    assert_eq!(users.len(), 4);
    let bindings: Vec<Value> = reqwest::get(c.url("/sim/bindings"))
        .await
        .expect("b")
        .json()
        .await
        .expect("json");
    assert_eq!(bindings.len(), 6);
    assert!(
        bindings
            .iter()
            .any(|b| b["scope"] == "project" && b["resource_id"] == "c-7x2k9:p-abcde")
    );
    c.h.sim.reset_stats();
    assert_eq!(c.h.sim.stats(), SimStats::default());
    c.stop().await;
}

#[tokio::test]
async fn new_bindings_settle_and_status_appears_from_2_11() {
    let c = Client::start(SimOptions {
        settle: Duration::from_millis(300),
        ..SimOptions::default()
    })
    .await;
    let (_, b) = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-bob01", "cluster-member", "c-7x2k9"),
        )
        .await;
    assert_eq!(b["status"]["summary"], "InProgress");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, b) = c
        .get(&format!(
            "/v3/clusterroletemplatebindings/{}",
            b["id"].as_str().unwrap_or_default()
        ))
        .await;
    assert_eq!(b["status"]["summary"], "Completed");
    // By principal alone: userId appears only once the controller (EnsureUser) has run.
    let body = json!({"clusterId": "local", "roleTemplateId": "nodes-view", "userPrincipalId": "github_user://6060"});
    let (status, b) = c.post("/v3/clusterroletemplatebindings", body).await;
    assert_eq!(status, 201, "{b}");
    assert_eq!(b["userId"], Value::Null);
    let uid = external_user_id("github_user://6060");
    assert!(
        c.ids(&format!("/v3/clusterroletemplatebindings?userId={uid}"))
            .await
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let id = b["id"].as_str().unwrap_or_default().to_string();
    let (_, b) = c.get(&format!("/v3/clusterroletemplatebindings/{id}")).await;
    assert_eq!(b["userId"], uid.as_str());
    assert_eq!(
        c.ids(&format!("/v3/clusterroletemplatebindings?userId={uid}")).await,
        [id.as_str()]
    );
    let (status, gone) = c.delete(&format!("/v3/clusterroletemplatebindings/{id}")).await;
    assert_eq!(status, 200);
    assert!(gone["removed"].is_string(), "{gone}");
    // A new local user's principalIds arrive with the controller too.
    let (_, dave) = c
        .post("/v3/users", json!({"username": "dave", "password": "long-enough-pw-1"}))
        .await;
    assert_eq!(dave["principalIds"], json!([]));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let (_, dave) = c
        .get(&format!("/v3/users/{}", dave["id"].as_str().unwrap_or_default()))
        .await;
    assert_eq!(
        dave["principalIds"],
        json!([format!("local://{}", dave["id"].as_str().unwrap_or_default())])
    );
    c.stop().await;
    let old = Client::start(version(10)).await;
    let (_, b) = old.get("/v3/clusterroletemplatebindings/c-7x2k9:crtb-grp01").await;
    assert!(b.get("status").is_none(), "{b}");
    old.stop().await;
}

#[tokio::test]
async fn the_large_dataset_has_the_documented_sizes_and_pages_fast() {
    let t = Instant::now();
    let sim = Sim::new(SimOptions {
        size: DatasetSize::Large,
        ..SimOptions::default()
    });
    let built = t.elapsed();
    let c = Client {
        h: SimHandle::start_sim(sim).await.expect("start"),
        http: reqwest::Client::new(),
        auth: format!("Bearer {DEFAULT_ACCESS_KEY}:{DEFAULT_SECRET_KEY}"),
    };
    let (_, clusters) = c.get("/v3/clusters?limit=1").await;
    assert_eq!(clusters["pagination"]["total"], 200);
    assert_eq!(c.get("/v3/projects?limit=1").await.1["pagination"]["total"], 2000);
    assert_eq!(c.get("/v3/users?limit=1").await.1["pagination"]["total"], 10_000);
    let namespaces: usize = {
        let st = lock(&c.h.sim.inner.state);
        st.namespaces.values().map(|n| n.len()).sum()
    };
    assert_eq!(namespaces, 20_000);
    assert_eq!(c.h.sim.bindings().len(), 50_000);
    let (_, prtbs) = c.get("/v3/projectroletemplatebindings?limit=1").await;
    let (_, crtbs) = c.get("/v3/clusterroletemplatebindings?limit=1").await;
    assert!(
        prtbs["pagination"]["total"].as_u64() > Some(10_000) && crtbs["pagination"]["total"].as_u64() > Some(5_000)
    );
    // Small-dataset ids are still there.
    assert_eq!(c.get("/v3/users/u-alice1").await.0, 200);
    let t = Instant::now();
    let (status, page) = c.get("/v3/projectroletemplatebindings?limit=5000").await;
    let paged = t.elapsed();
    assert_eq!(status, 200);
    assert_eq!(page["data"].as_array().map(Vec::len), Some(5000));
    eprintln!("large dataset built in {built:?}; a page of 5000 PRTBs in {paged:?} (debug build)");
    assert!(built < Duration::from_secs(10), "{built:?}");
    // Deterministic for a seed.
    let again = Sim::new(SimOptions {
        size: DatasetSize::Large,
        ..SimOptions::default()
    });
    assert_eq!(again.bindings()[20_000], c.h.sim.bindings()[20_000]);
    c.stop().await;
}

#[tokio::test]
async fn objects_have_the_norman_shape_and_their_self_links_resolve() {
    let c = Client::start(SimOptions::default()).await;
    for path in [
        "/v3/clusterroletemplatebindings/c-7x2k9:crtb-grp01",
        "/v3/globalrolebindings/grb-admin",
        "/v3/projectroletemplatebindings/p-abcde:prtb-b0b01",
        "/v3/users/u-alice1",
        "/v3/projects/c-7x2k9:p-x4m7q",
        "/v3/cluster/local/namespaces/default",
        "/v3/roletemplates/cluster-owner",
        "/v3/globalroles/admin",
        "/v3/clusters/c-7x2k9",
    ] {
        let (status, obj) = c.get(path).await;
        assert_eq!(status, 200, "{path}: {obj}");
        for field in [
            "id",
            "type",
            "baseType",
            "name",
            "links",
            "labels",
            "annotations",
            "created",
            "state",
        ] {
            assert!(obj.get(field).is_some(), "{path} lacks {field}: {obj}");
        }
        let link = obj["links"]["self"].as_str().unwrap_or_default().to_string();
        assert!(link.starts_with(&c.h.base_url), "{link}");
        let (status, again) = c.get(&link).await;
        assert_eq!((status, &again["id"]), (200, &obj["id"]), "{link}");
    }
    let (_, crtb) = c.get("/v3/clusterroletemplatebindings/c-7x2k9:crtb-grp01").await;
    assert_eq!(crtb["type"], "clusterRoleTemplateBinding");
    assert_eq!(crtb["name"], "crtb-grp01");
    assert_eq!(crtb["created"], "2025-03-01T09:40:00Z");
    assert_eq!(crtb["userId"], Value::Null, "null, not absent");
    let (_, cluster) = c.get("/v3/clusters/c-7x2k9").await;
    assert_eq!(
        (cluster["name"].clone(), cluster["labels"]["env"].clone()),
        (json!("prod-eu"), json!("prod"))
    );
    let (_, page) = c.get("/v3/clusters?limit=1").await;
    assert_eq!(page["type"], "collection");
    assert_eq!(page["resourceType"], "cluster");
    assert_eq!(page["filters"]["name"], Value::Null);
    c.stop().await;
}

#[tokio::test]
async fn with_a_removal_delay_a_deleted_binding_lingers_with_removed_set() {
    let c = Client::start(SimOptions {
        removal_delay: Duration::from_millis(300),
        ..SimOptions::default()
    })
    .await;
    let id = "p-abcde:prtb-b0b01";
    let path = format!("/v3/projectroletemplatebindings/{id}");
    let (status, gone) = c.delete(&path).await;
    assert_eq!(status, 200);
    assert!(gone["removed"].is_string() && gone["state"] == "removing", "{gone}");
    let (status, still) = c.get(&path).await;
    assert_eq!(status, 200, "still there while finalizers run");
    assert!(still["removed"].is_string());
    assert_eq!(c.ids("/v3/projectroletemplatebindings?userId=u-bob01").await, [id]);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_error(&c.get(&path).await, 404, "NotFound");
    assert!(c.h.sim.bindings().iter().all(|b| b.id != id));
    c.stop().await;
}

#[tokio::test]
async fn malformed_input_gets_rancher_shaped_errors() {
    let c = Client::start(SimOptions::default()).await;
    for path in [
        "/v3/users/%ZZ",
        "/v3/users/%",
        "/v3/principals/%E2%28",
        "/v3/cluster/local/namespaces/a/b",
    ] {
        let answer = c.get(path).await;
        assert_error(&answer, 404, "NotFound");
    }
    for q in [
        "limit=abc",
        "limit=-7",
        "limit=99999999999999999999",
        "marker=",
        "sort=nope&order=sideways",
        "%%%=1",
    ] {
        let (status, page) = c.get(&format!("/v3/users?{q}")).await;
        assert_eq!(status, 200, "{q}: {page}");
        assert_eq!(page["data"].as_array().map(Vec::len), Some(4), "{q}");
    }
    for body in [
        "null",
        "[]",
        "\"x\"",
        "{\"username\": 5}",
        "{\"username\":\"z\",\"labels\":[1]}",
    ] {
        let resp = c
            .http
            .post(c.url("/v3/users"))
            .header("Authorization", &c.auth)
            .body(body)
            .send()
            .await;
        let resp = resp.expect("request");
        assert_eq!(resp.status().as_u16(), 422, "{body}");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["type"], "error", "{body}");
    }
    let answer = c.post("/v3/users/u-alice1?action=explode", json!({})).await;
    assert_error(&answer, 404, "ActionNotAvailable");
    assert_error(
        &c.post(
            "/v3/users/u-nope?action=setpassword",
            json!({"newPassword": "long-enough-pw-9"}),
        )
        .await,
        404,
        "NotFound",
    );
    let basic = c
        .send(c.http.get(c.url("/v3")).header("Authorization", "Basic !!!"))
        .await;
    assert_eq!(basic.0, 401);
    let cookie = format!("R_SESS={DEFAULT_ACCESS_KEY}:{DEFAULT_SECRET_KEY}");
    assert_eq!(c.send(c.http.get(c.url("/v3")).header("Cookie", cookie)).await.0, 200);
    assert_error(&c.send(c.http.get(c.url("/k8s/clusters/local"))).await, 404, "NotFound");
    c.stop().await;
}

#[test]
fn external_user_id_matches_an_independent_base32() {
    // Python: "u-" + base64.b32encode(hashlib.sha256(p.encode()).digest()).decode()[:10].lower()
    assert_eq!(external_user_id("github_user://4242"), "u-t3pwg2epgg");
    assert_eq!(external_user_id("github_user://5151"), "u-dpuo33tiay");
}
