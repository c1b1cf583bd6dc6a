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

    // A v3 key sent as an ext token is looked up among ext tokens: not there
    // (`pkg/auth/requests/authenticate.go`). Basic auth works.
    let ext = format!("Bearer ext/{DEFAULT_ACCESS_KEY}:{DEFAULT_SECRET_KEY}");
    assert_eq!(
        c.send(c.http.get(c.url("/v3")).header("Authorization", ext)).await,
        (401, expected.clone())
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

/// A cluster-scoped key authenticates only on paths routed to its cluster; everywhere else it
/// gets the one 401 body Rancher has, which never names the scope (`pkg/auth/requests/filter.go`
/// writes "must authenticate" whatever `authenticate.go` wrapped; review F5/S6).
#[tokio::test]
async fn tokens_endpoint_and_a_cluster_scoped_key_refused_with_the_plain_401() {
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

    let plain = json!({"type": "error", "status": "401", "message": "Unauthorized 401: must authenticate"});
    c.h.sim.set_key_scope(Some("c-7x2k9"));
    for path in [
        format!("/v3/tokens/{DEFAULT_ACCESS_KEY}"),
        "/v3/users?me=true".to_string(),
        "/v3/clusters".to_string(),
        "/v3/clusters/local".to_string(),
        "/k8s/clusters/local/version".to_string(),
    ] {
        assert_eq!(c.get(&path).await, (401, plain.clone()), "{path}");
    }
    assert_eq!(c.get("/v3/clusters/c-7x2k9").await.0, 200);
    assert_eq!(c.get("/v3/cluster/c-7x2k9/namespaces").await.0, 200);
    let (status, version) = c.get("/k8s/clusters/c-7x2k9/version").await;
    assert_eq!((status, version["major"].as_str()), (200, Some("1")));
    c.h.sim.set_key_scope(None);
    assert_eq!(c.get("/v3/users?me=true").await.0, 200);

    let scoped = Client::start(SimOptions {
        key_cluster_id: Some("local".into()),
        ..SimOptions::default()
    })
    .await;
    assert_eq!(scoped.get("/v3/clusters/local").await.0, 200);
    assert_eq!(scoped.get("/v3/clusters").await, (401, plain));
    scoped.stop().await;
    c.stop().await;
}

/// 2.12+ ext tokens (rancher-api-notes §3, §5; rancher `pkg/apis/ext.cattle.io/v1/types.go`):
/// sent as `ext/<name>:<secret>`, read at `/v1/ext.cattle.io.tokens/<name>` with `spec.ttl` in ms
/// and `status.expiresAt`; not a v3 token.
#[tokio::test]
async fn an_ext_key_authenticates_with_its_prefix_and_reads_its_token() {
    let c = Client::start(SimOptions::default()).await;
    c.h.sim.set_api_key("ext/tok-ext01", "3xts3cr3t");
    c.h.sim.set_key_expiry(Some(Utc::now() + chrono::Duration::days(30)));
    assert_eq!(
        c.h.sim.api_key(),
        ("ext/tok-ext01".to_string(), "3xts3cr3t".to_string())
    );
    let with = |path: &str, auth: &str| c.http.get(c.url(path)).header("Authorization", auth.to_string());
    let ext = "Bearer ext/tok-ext01:3xts3cr3t";
    assert_eq!(c.send(with("/v3/users?me=true", ext)).await.0, 200);
    assert_eq!(
        c.send(with("/v3/users?me=true", "Bearer tok-ext01:3xts3cr3t")).await.0,
        401,
        "without its prefix it is looked up among v3 tokens"
    );
    let (status, token) = c.send(with("/v1/ext.cattle.io.tokens/tok-ext01", ext)).await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(token["metadata"]["name"], "tok-ext01");
    assert_eq!(token["spec"]["userID"], ADMIN_USER_ID);
    assert_eq!(token["spec"]["enabled"], true);
    assert_eq!(token["spec"]["clusterName"], "");
    assert!(token["spec"]["ttl"].as_i64().is_some_and(|t| t > 0), "{token}");
    assert_eq!(token["status"]["expired"], false);
    let expires = token["status"]["expiresAt"].as_str().unwrap_or_default();
    assert!(DateTime::parse_from_rfc3339(expires).is_ok(), "{token}");
    let (status, missing) = c.send(with("/v1/ext.cattle.io.tokens/tok-other", ext)).await;
    assert_eq!((status, missing["code"].as_str()), (404, Some("NotFound")));
    assert_error(&c.send(with("/v3/tokens/tok-ext01", ext)).await, 404, "NotFound");
    assert_eq!(c.h.sim.stats().route("GET /v1/ext.cattle.io.tokens/{id}"), 2);
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
    // Once the controller has backfilled `local://u-bob01`, the same principal is a duplicate
    // (the webhook compares raw fields); another role is not.
    c.h.sim.reconcile_now();
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
    assert_eq!(b["userPrincipalId"], Value::Null, "the 201 is what was posted");
    c.h.sim.reconcile_now();
    let (_, later) = c
        .get(&format!(
            "/v3/clusterroletemplatebindings/{}",
            b["id"].as_str().unwrap_or_default()
        ))
        .await;
    assert_eq!(
        later["userPrincipalId"], "local://u-alice1",
        "backfilled by the controller"
    );
    // Before 2.12 there is no backingNamespace and every project uses p-y.
    let old_version = Client::start(version(11)).await;
    let (_, p) = old_version.get("/v3/projects/c-7x2k9:p-x4m7q").await;
    assert!(p.get("backingNamespace").is_none(), "{p}");
    c.stop().await;
    old_version.stop().await;
}

/// A binding by principal alone: the 201 has no `userId`; the controller's EnsureUser
/// (`crtb_handler.go` reconcileSubject, `usermanager.go` EnsureUser) makes the user
/// `u-<base32(sha256(principal))[:10]>` with a GRB for every `newUserDefault` global role
/// (`createUsersBindings`), and the binding shows `userId` on the next read (review S7, S11).
#[tokio::test]
async fn a_binding_by_user_principal_ensures_the_user() {
    let c = Client::start(SimOptions {
        controller_delay: Duration::from_secs(3600),
        ..SimOptions::default()
    })
    .await;
    let principal = "github_user://5151";
    let uid = external_user_id(principal);
    let body = json!({"clusterId": "c-7x2k9", "roleTemplateId": "cluster-member", "userPrincipalId": principal});
    let (status, b) = c.post("/v3/clusterroletemplatebindings", body).await;
    assert_eq!(status, 201, "{b}");
    assert_eq!(b["userId"], Value::Null, "EnsureUser has not run: {b}");
    assert_eq!(b["userPrincipalId"], principal);
    assert!(b.get("status").is_none(), "{b}");
    assert_eq!(
        b["annotations"]["auth.cattle.io/principal-display-name"], "Hubot Robot",
        "rtb_store.go puts the principal's display name on the binding"
    );
    let path = format!(
        "/v3/clusterroletemplatebindings/{}",
        b["id"].as_str().unwrap_or_default()
    );
    assert_eq!(c.get(&path).await.1["userId"], Value::Null);
    assert_error(&c.get(&format!("/v3/users/{uid}")).await, 404, "NotFound");

    c.h.sim.reconcile_now();
    assert_eq!(c.get(&path).await.1["userId"], uid.as_str());
    let (status, user) = c.get(&format!("/v3/users/{uid}")).await;
    assert_eq!(status, 200);
    assert_eq!(user["principalIds"], json!([principal]));
    assert_eq!(user["name"], "Hubot Robot");
    let grbs = c.all(&format!("/v3/globalrolebindings?userId={uid}")).await;
    let roles: Vec<&str> = grbs.iter().filter_map(|g| g["globalRoleId"].as_str()).collect();
    assert_eq!(roles, ["user"], "the install's newUserDefault roles");

    // A second binding reuses the user.
    let body = json!({"projectId": "c-7x2k9:p-abcde", "roleTemplateId": "read-only", "userPrincipalId": principal});
    assert_eq!(c.post("/v3/projectroletemplatebindings", body).await.0, 201);
    c.h.sim.reconcile_now();
    assert_eq!(
        c.h.sim
            .users()
            .iter()
            .filter(|u| u.principal_ids == [principal])
            .count(),
        1
    );
    assert_eq!(
        c.ids(&format!("/v3/projectroletemplatebindings?userId={uid}"))
            .await
            .len(),
        1
    );

    // With `user-base` as the only default, that is what a new external user gets.
    c.h.sim.set_new_user_default("user", false);
    c.h.sim.set_new_user_default("user-base", true);
    let mona = "github_user://6060";
    let body = json!({"clusterId": "local", "roleTemplateId": "nodes-view", "userPrincipalId": mona});
    assert_eq!(c.post("/v3/clusterroletemplatebindings", body).await.0, 201);
    c.h.sim.reconcile_now();
    let grbs = c
        .all(&format!("/v3/globalrolebindings?userId={}", external_user_id(mona)))
        .await;
    let roles: Vec<&str> = grbs.iter().filter_map(|g| g["globalRoleId"].as_str()).collect();
    assert_eq!(roles, ["user-base"]);

    // `local://u-x` is not looked up on create: an existing user is found by EnsureUser, a
    // missing one is accepted (201) and EnsureUser makes a user for that principal.
    let body = json!({"clusterId": "local", "roleTemplateId": "cluster-member", "userPrincipalId": "local://u-bob01"});
    let (_, bob) = c.post("/v3/clusterroletemplatebindings", body).await;
    let body = json!({"clusterId": "local", "roleTemplateId": "cluster-member", "userPrincipalId": "local://u-nope"});
    let (status, ghost) = c.post("/v3/clusterroletemplatebindings", body).await;
    assert_eq!(status, 201, "{ghost}");
    c.h.sim.reconcile_now();
    let read = |b: &Value| {
        format!(
            "/v3/clusterroletemplatebindings/{}",
            b["id"].as_str().unwrap_or_default()
        )
    };
    assert_eq!(c.get(&read(&bob)).await.1["userId"], "u-bob01");
    let ghost_user = external_user_id("local://u-nope");
    assert_eq!(c.get(&read(&ghost)).await.1["userId"], ghost_user.as_str());
    assert!(
        c.h.sim
            .users()
            .iter()
            .any(|u| u.id == ghost_user && u.principal_ids == ["local://u-nope"])
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

/// S8: for a binding made with `userId` only, the controller fills `userPrincipalId` only with
/// a principal ending with the user id (`crtb_handler.go` reconcileSubject: `strings.HasSuffix`),
/// never the user's external principal; the 2.14+ webhook's duplicate check compares raw fields
/// and never resolves a principal to its user (rancher/webhook
/// `clusterroletemplatebinding/validator.go` isDuplicate).
#[tokio::test]
async fn principal_backfill_is_local_only_and_duplicates_compare_raw_fields() {
    let c = Client::start(version(14)).await;
    let octo_principal = "github_user://4242";
    let octo = external_user_id(octo_principal);
    let (status, by_id) = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb(&octo, "cluster-member", "c-7x2k9"),
        )
        .await;
    assert_eq!(status, 201, "{by_id}");
    let (_, alice) = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-alice1", "cluster-member", "c-7x2k9"),
        )
        .await;
    c.h.sim.reconcile_now();
    let read = |b: &Value| {
        format!(
            "/v3/clusterroletemplatebindings/{}",
            b["id"].as_str().unwrap_or_default()
        )
    };
    assert_eq!(
        c.get(&read(&by_id)).await.1["userPrincipalId"],
        Value::Null,
        "an external user's principal is never backfilled"
    );
    assert_eq!(c.get(&read(&alice)).await.1["userPrincipalId"], "local://u-alice1");
    assert!(
        c.ids(&format!(
            "/v3/clusterroletemplatebindings?userPrincipalId={octo_principal}"
        ))
        .await
        .is_empty(),
        "a revoke that lists by principal does not see the userId binding"
    );
    // The same person by principal is not a duplicate of the userId binding.
    let body = json!({"clusterId": "c-7x2k9", "roleTemplateId": "cluster-member", "userPrincipalId": octo_principal});
    let (status, by_principal) = c.post("/v3/clusterroletemplatebindings", body.clone()).await;
    assert_eq!(status, 201, "{by_principal}");
    c.h.sim.reconcile_now();
    assert_eq!(
        c.ids(&format!("/v3/clusterroletemplatebindings?userId={octo}"))
            .await
            .len(),
        2
    );
    // The same raw principal again is.
    assert_error(&c.post("/v3/clusterroletemplatebindings", body).await, 409, "Conflict");
    c.stop().await;
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
    // An unknown global role: the GRB store's lister NotFound becomes Norman's 404
    // (`store/globalrolebindings/globalrolebinding_store.go` addOwnerReference; review S4).
    let unknown = c
        .post(
            "/v3/globalrolebindings",
            json!({"globalRoleId": "nope", "userId": "u-bob01"}),
        )
        .await;
    assert_error(&unknown, 404, "NotFound");
    assert_eq!(
        unknown.1["message"],
        "globalroles.management.cattle.io \"nope\" not found"
    );
    c.stop().await;
}

/// Refused binding creates, with Rancher's answers in Rancher's order: Norman's validator
/// (`customization/roletemplatebinding/validator.go`: the role template first, an unknown one a
/// 500 "Error getting role template"; locked 422; wrong context 422; then the subject 422), then
/// Kubernetes (a cluster or project that does not exist: its namespace is not found, 404).
/// Rancher has no reference validator, so nothing here is a 422 `InvalidReference` (review S3).
#[tokio::test]
async fn bad_bindings_get_the_rancher_answers_and_create_nothing() {
    let c = Client::start(SimOptions::default()).await;
    let post = |body: Value| c.post("/v3/clusterroletemplatebindings", body);
    let unknown = post(crtb("u-bob01", "no-such-role", "c-7x2k9")).await;
    assert_error(&unknown, 500, "ServerError");
    assert_eq!(
        unknown.1["message"],
        "Error getting role template: roletemplates.management.cattle.io \"no-such-role\" not found"
    );
    let unknown_prtb = c
        .post(
            "/v3/projectroletemplatebindings",
            prtb("u-bob01", "no-such-role", "c-7x2k9:p-abcde"),
        )
        .await;
    assert_error(&unknown_prtb, 500, "ServerError");
    // The role is checked before the subject.
    let no_subject_bad_role = post(json!({"clusterId": "c-7x2k9", "roleTemplateId": "nope"})).await;
    assert_error(&no_subject_bad_role, 500, "ServerError");
    let missing = post(json!({"clusterId": "c-7x2k9", "userId": "u-bob01"})).await;
    assert_error(&missing, 422, "MissingRequired");
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
    let no_cluster = post(crtb("u-bob01", "cluster-member", "c-nope")).await;
    assert_error(&no_cluster, 404, "NotFound");
    assert_eq!(no_cluster.1["message"], "namespaces \"c-nope\" not found");
    // An unknown project depends on the version: see
    // `an_unknown_project_is_a_404_before_2_12_and_a_500_from_2_12`.
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

/// S5: no reference validation on `userId` (no `ReferenceValidator` in Rancher; the webhook's
/// `validateCreateFields` does not look users up): the create is a 201 and the binding exists,
/// pointing at no user; on 2.11+ the controller then reports `Error` (`crtb_handler.go`
/// reconcileSubject: FailedToGetSubject).
#[tokio::test]
async fn an_unknown_user_id_is_accepted_and_the_controller_reports_error() {
    let c = Client::start(SimOptions::default()).await;
    let (status, b) = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-nobody", "cluster-member", "c-7x2k9"),
        )
        .await;
    assert_eq!(status, 201, "{b}");
    assert_eq!(b["userId"], "u-nobody");
    assert!(
        c.h.sim
            .bindings()
            .iter()
            .any(|x| x.user_id.as_deref() == Some("u-nobody"))
    );
    assert!(c.h.sim.users().iter().all(|u| u.id != "u-nobody"), "no user was made");
    c.h.sim.reconcile_now();
    let (_, read) = c
        .get(&format!(
            "/v3/clusterroletemplatebindings/{}",
            b["id"].as_str().unwrap_or_default()
        ))
        .await;
    assert_eq!(read["status"]["summary"], "Error", "{read}");
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
    assert_eq!(carol["principalIds"], json!([]), "filled by a controller, later");
    c.h.sim.reconcile_now();
    assert_eq!(
        c.get(&format!("/v3/users/{id}")).await.1["principalIds"],
        json!([format!("local://{id}")])
    );
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

/// Latency and slow faults delay `/v3` answers (a lower bound only), requests are served
/// concurrently (a fast one is answered while a slow one still waits), `/sim` is never delayed.
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
    assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
    c.h.sim.set_latency(Duration::ZERO);

    // One request held for an hour does not hold up the others, nor /sim.
    c.h.sim.slow_next_on("GET /v3/users", 1, Duration::from_secs(3600));
    let held = tokio::spawn({
        let http = c.http.clone();
        let (url, auth) = (c.url("/v3/users"), c.auth.clone());
        async move {
            http.get(url)
                .header("Authorization", auth)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    while c.h.sim.stats().route("GET /v3/users") < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(c.get("/v3/clusters").await.0, 200);
    let stats: SimStats = reqwest::get(c.url("/sim/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(stats.route("GET /v3/clusters"), 2);
    assert!(!held.is_finished(), "the held request is still waiting");
    held.abort();

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
    // Asking for the stats opened one more connection.
    assert_eq!(over_http.connections, stats.connections + 1);
    assert_eq!(
        SimStats {
            connections: 0,
            ..over_http
        },
        SimStats {
            connections: 0,
            ..stats
        }
    );
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

/// The `status` of a binding read back, `Null` when it has none.
async fn status_of(c: &Client, path: &str) -> Value {
    let (code, b) = c.get(path).await;
    assert_eq!(code, 200, "{b}");
    b.get("status").cloned().unwrap_or(Value::Null)
}

fn binding_path(collection: &str, made: &Value) -> String {
    format!("/v3/{collection}/{}", made["id"].as_str().unwrap_or_default())
}

/// Creates a CRTB (201 expected) and returns its path.
async fn post_crtb(c: &Client, user: &str, role: &str, cluster: &str) -> String {
    let (code, made) = c
        .post("/v3/clusterroletemplatebindings", crtb(user, role, cluster))
        .await;
    assert_eq!(code, 201, "{made}");
    binding_path("clusterroletemplatebindings", &made)
}

/// S7, CRTBs on 2.11+ (rancher `pkg/controllers/management/auth/crtb_handler.go` and
/// `pkg/controllers/managementuser/rbac/crtb_handler.go`, `updateStatus`): the 201 has no
/// `status`; the management pass writes `summaryLocal: Completed`; `summary: Completed` comes
/// only with the downstream pass's `summaryRemote`. Never `InProgress`.
#[tokio::test]
async fn a_crtb_gets_summary_local_then_summary_once_its_cluster_applied_it() {
    let hour = Duration::from_secs(3600);
    for minor in [12, 13] {
        let c = Client::start(SimOptions {
            version: RancherVersion::new(minor),
            controller_delay: hour,
            settle: hour,
            ..SimOptions::default()
        })
        .await;
        let (code, made) = c
            .post(
                "/v3/clusterroletemplatebindings",
                crtb("u-bob01", "cluster-member", "c-7x2k9"),
            )
            .await;
        assert_eq!(code, 201, "{made}");
        assert!(made.get("status").is_none(), "2.{minor}: the 201 has no status: {made}");
        let before = binding_path("clusterroletemplatebindings", &made);
        assert_eq!(
            status_of(&c, &before).await,
            Value::Null,
            "2.{minor}: before the management pass"
        );

        // The management pass has run (at once), the downstream one has not.
        c.h.sim.set_controller_delay(Duration::ZERO);
        let local_only = post_crtb(&c, "u-alice1", "nodes-view", "c-7x2k9").await;
        let status = status_of(&c, &local_only).await;
        assert_eq!(status["summaryLocal"], "Completed", "2.{minor}: {status}");
        assert!(
            status.get("summary").is_none() && status.get("summaryRemote").is_none(),
            "2.{minor}: no summary before the cluster applied it: {status}"
        );

        c.h.sim.reconcile_now();
        for path in [&before, &local_only] {
            let status = status_of(&c, path).await;
            assert_eq!(
                (
                    status["summary"].clone(),
                    status["summaryLocal"].clone(),
                    status["summaryRemote"].clone()
                ),
                (json!("Completed"), json!("Completed"), json!("Completed")),
                "2.{minor} {path}: {status}"
            );
        }
        let all = c.all("/v3/clusterroletemplatebindings").await;
        assert!(
            !Value::Array(all).to_string().contains("InProgress"),
            "2.{minor}: a binding is never InProgress"
        );
        c.stop().await;
    }
}

/// While a cluster's agent is disconnected its CRTBs keep `summaryLocal: Completed` and no
/// `summary` (the downstream handler runs in the agent); once it is back they complete.
#[tokio::test]
async fn a_crtb_on_a_disconnected_cluster_gets_no_summary_until_the_agent_is_back() {
    let c = Client::start(SimOptions {
        controller_delay: Duration::ZERO,
        ..SimOptions::default()
    })
    .await;
    assert!(c.h.sim.disconnect_cluster("c-7x2k9", true));
    let path = post_crtb(&c, "u-bob01", "cluster-member", "c-7x2k9").await;
    c.h.sim.reconcile_now();
    let status = status_of(&c, &path).await;
    assert_eq!(status["summaryLocal"], "Completed", "{status}");
    assert!(status.get("summary").is_none(), "{status}");
    // Another cluster's binding completes meanwhile.
    let other = post_crtb(&c, "u-bob01", "cluster-member", "c-m-4bq8z2lp").await;
    c.h.sim.reconcile_now();
    assert_eq!(status_of(&c, &other).await["summary"], "Completed");

    c.h.sim.disconnect_cluster("c-7x2k9", false);
    let status = status_of(&c, &path).await;
    assert_eq!(
        (status["summary"].clone(), status["summaryRemote"].clone()),
        (json!("Completed"), json!("Completed")),
        "{status}"
    );
    c.stop().await;
}

/// GRBs on 2.11+ (`globalrolebinding_handler.go` updateStatus): `Completed` after the local pass;
/// a GRB of an admin role waits for its downstream pass too.
#[tokio::test]
async fn a_grb_is_completed_after_its_local_pass_an_admin_one_after_the_downstream_one() {
    let c = Client::start(SimOptions {
        controller_delay: Duration::ZERO,
        settle: Duration::from_secs(3600),
        ..SimOptions::default()
    })
    .await;
    let grb = |role: &str| json!({"globalRoleId": role, "userId": "u-bob01"});
    let (code, made) = c.post("/v3/globalrolebindings", grb("clusters-create")).await;
    assert_eq!(code, 201, "{made}");
    assert!(made.get("status").is_none(), "{made}");
    let plain = binding_path("globalrolebindings", &made);
    let (_, made) = c.post("/v3/globalrolebindings", grb("admin")).await;
    let admin = binding_path("globalrolebindings", &made);
    let status = status_of(&c, &plain).await;
    assert_eq!(
        (status["summary"].clone(), status["summaryLocal"].clone()),
        (json!("Completed"), json!("Completed")),
        "{status}"
    );
    assert!(status.get("summaryRemote").is_none(), "{status}");
    let status = status_of(&c, &admin).await;
    assert_eq!(status["summaryLocal"], "Completed", "{status}");
    assert!(status.get("summary").is_none(), "an admin GRB waits: {status}");
    c.h.sim.reconcile_now();
    assert_eq!(status_of(&c, &admin).await["summary"], "Completed");
    c.stop().await;
}

/// PRTBs have no `status` on any version (`authz_types.go`: no `Status` field on
/// `ProjectRoleTemplateBinding`; rancher/rancher#44661 closed unimplemented), neither after the
/// controller's pass nor for a subject that does not exist; the controller still fills in a
/// principal's `userId`. Before 2.11 no binding has a status.
#[tokio::test]
async fn prtbs_never_have_a_status_and_before_2_11_no_binding_has_one() {
    for minor in [10, 12, 13] {
        let c = Client::start(version(minor)).await;
        let made = [
            prtb("u-bob01", "project-member", "c-7x2k9:p-x4m7q"),
            prtb("u-nobody", "read-only", "c-7x2k9:p-abcde"),
            json!({"projectId": "c-7x2k9:p-abcde", "roleTemplateId": "project-member", "userPrincipalId": "github_user://6060"}),
        ];
        let mut paths = Vec::new();
        for body in made {
            let (code, b) = c.post("/v3/projectroletemplatebindings", body).await;
            assert_eq!(code, 201, "2.{minor}: {b}");
            paths.push(binding_path("projectroletemplatebindings", &b));
        }
        c.h.sim.reconcile_now();
        paths.push("/v3/projectroletemplatebindings/p-abcde:prtb-b0b01".into());
        for p in &paths {
            assert_eq!(status_of(&c, p).await, Value::Null, "2.{minor} {p}");
        }
        let (_, by_principal) = c.get(&paths[2]).await;
        assert_eq!(
            by_principal["userId"],
            json!(external_user_id("github_user://6060")),
            "2.{minor}: EnsureUser still runs"
        );
        let (_, crtb_made) = c
            .post(
                "/v3/clusterroletemplatebindings",
                crtb("u-bob01", "cluster-member", "c-7x2k9"),
            )
            .await;
        c.h.sim.reconcile_now();
        let crtb_status = status_of(&c, &binding_path("clusterroletemplatebindings", &crtb_made)).await;
        if minor >= 11 {
            assert_eq!(crtb_status["summary"], "Completed", "2.{minor}");
        } else {
            assert_eq!(crtb_status, Value::Null, "2.{minor}: no status before 2.11");
            assert_eq!(status_of(&c, "/v3/globalrolebindings/grb-admin").await, Value::Null);
        }
        c.stop().await;
    }
}

/// S3 for projects. Before 2.12 the scoped store only sets the namespace, so an unknown project
/// is Kubernetes' 404 for it (after the principal lookup); from 2.12 the scoped store looks the
/// project up before anything else and Norman answers the lister's NotFound as a 500
/// (`pkg/api/norman/store/scoped/store.go`, `httperror/handler`), for every kind of subject.
#[tokio::test]
async fn an_unknown_project_is_a_404_before_2_12_and_a_500_from_2_12() {
    for minor in [10, 12, 13] {
        let c = Client::start(SimOptions {
            version: RancherVersion::new(minor),
            resolve_external_principals: false,
            ..SimOptions::default()
        })
        .await;
        let before = c.h.sim.bindings().len();
        let post = |body: Value| c.post("/v3/projectroletemplatebindings", body);
        let by_user = post(prtb("u-bob01", "read-only", "c-7x2k9:p-nope1")).await;
        let by_group = post(json!({"projectId": "c-7x2k9:p-nope1", "roleTemplateId": "read-only", "groupPrincipalId": "github_team://777"})).await;
        let by_principal = post(json!({"projectId": "c-7x2k9:p-nope1", "roleTemplateId": "read-only", "userPrincipalId": "github_user://5151"})).await;
        if minor >= 12 {
            for answer in [&by_user, &by_group, &by_principal] {
                assert_error(answer, 500, "ServerError");
                assert_eq!(
                    answer.1["message"], "projects.management.cattle.io \"c-7x2k9/p-nope1\" not found",
                    "2.{minor}"
                );
            }
        } else {
            for answer in [&by_user, &by_group] {
                assert_error(answer, 404, "NotFound");
                assert_eq!(answer.1["message"], "namespaces \"p-nope1\" not found");
            }
            // The principal is looked up first, by the local key owner's provider.
            assert_error(&by_principal, 500, "ServerError");
            assert_eq!(
                by_principal.1["message"],
                "users.management.cattle.io \"5151\" not found"
            );
        }
        // An unknown role is still answered first.
        let bad_role = post(prtb("u-bob01", "no-such-role", "c-7x2k9:p-nope1")).await;
        assert!(
            bad_role.1["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Error getting role template"),
            "2.{minor}: {}",
            bad_role.1
        );
        assert_eq!(c.h.sim.bindings().len(), before, "2.{minor}: nothing was created");
        let (code, _) = post(prtb("u-bob01", "read-only", "c-7x2k9:p-abcde")).await;
        assert_eq!(code, 201, "2.{minor}: a project that exists");
        c.stop().await;
    }
}

#[tokio::test]
async fn the_large_dataset_has_the_documented_sizes() {
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
    // Timings are printed for the reader, not asserted (a loaded CI machine is slow).
    eprintln!("large dataset built in {built:?}; a page of 5000 PRTBs in {paged:?} (debug build)");
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

/// Polls `path` until it answers 404 (bounded, so a regression fails instead of hanging).
async fn wait_for_404(c: &Client, path: &str) {
    for _ in 0..200 {
        if c.get(path).await.0 == 404 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} still readable after 10 s");
}

/// Rancher: a DELETE answers 200 with `removed` set while finalizers run and GET still finds the
/// object (rancher-api-notes §1, §4); a create of the same name meanwhile is Kubernetes' 409
/// AlreadyExists "object is being deleted: ..." (k8s.io/apiserver
/// `pkg/registry/generic/registry/store.go`; review rancher.md F9/S9), a wait, not "done".
#[tokio::test]
async fn with_a_removal_delay_a_deleted_binding_lingers_and_its_name_is_being_deleted() {
    let c = Client::start(SimOptions {
        removal_delay: Duration::from_secs(2),
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

    let mut again = prtb("u-bob01", "project-member", "c-7x2k9:p-abcde");
    again["name"] = json!("prtb-b0b01");
    let refused = c.post("/v3/projectroletemplatebindings", again.clone()).await;
    assert_error(&refused, 409, "AlreadyExists");
    let message = refused.1["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("object is being deleted: "),
        "the old binding is on its way out: {message}"
    );

    wait_for_404(&c, &path).await;
    assert!(c.h.sim.bindings().iter().all(|b| b.id != id));
    let (status, created) = c.post("/v3/projectroletemplatebindings", again).await;
    assert_eq!(status, 201, "the name is free once the old binding is gone: {created}");
    assert_eq!(created["id"], id);
    // A live binding's name gives the plain AlreadyExists.
    let mut third = prtb("u-bob01", "project-member", "c-7x2k9:p-abcde");
    third["name"] = json!("prtb-b0b01");
    let plain = c.post("/v3/projectroletemplatebindings", third).await;
    assert_error(&plain, 409, "AlreadyExists");
    assert!(
        !plain.1["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("object is being deleted")
    );
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
    assert_eq!(
        c.send(c.http.get(c.url("/k8s/clusters/local/version"))).await.0,
        401,
        "authentication comes first"
    );
    assert_error(&c.get("/k8s/clusters/local/nothing").await, 404, "NotFound");
    assert_error(&c.send(c.http.get(c.url("/nope"))).await, 404, "NotFound");
    c.stop().await;
}

#[test]
fn external_user_id_matches_an_independent_base32() {
    // Python: "u-" + base64.b32encode(hashlib.sha256(p.encode()).digest()).decode()[:10].lower()
    assert_eq!(external_user_id("github_user://4242"), "u-t3pwg2epgg");
    assert_eq!(external_user_id("github_user://5151"), "u-dpuo33tiay");
}

// ----- issue 9: the situations a revoke must survive, as real Rancher has them -----

/// Rancher keeps `labels` and `annotations` on create and merges them on update like every
/// Norman object (rancher-api-notes §6, rancher/norman `types/mapper/metadata.go`; updates go to
/// Kubernetes as a strategic merge patch, rancher/norman `store/proxy/proxy_store.go` Update,
/// so `null` removes a key). The webhook refuses to change the role, the resource or a set
/// subject (rancher/webhook `clusterroletemplatebinding/validator.go` `validateUpdateFields`).
#[tokio::test]
async fn bindings_keep_labels_and_annotations_and_put_changes_only_those() {
    let c = Client::start(SimOptions::default()).await;
    let mut body = crtb("u-bob01", "cluster-member", "c-7x2k9");
    body["labels"] = json!({"apono.io/managed": "true"});
    body["annotations"] = json!({"apono.io/grant": "g-1", "apono.io/expires-at": "2030-01-01T00:00:00Z"});
    let (status, made) = c.post("/v3/clusterroletemplatebindings", body).await;
    assert_eq!(status, 201, "{made}");
    let id = made["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(made["labels"]["apono.io/managed"], "true");
    assert_eq!(made["annotations"]["apono.io/grant"], "g-1");
    let path = format!("/v3/clusterroletemplatebindings/{id}");
    let (_, read) = c.get(&path).await;
    assert_eq!(read["annotations"]["apono.io/expires-at"], "2030-01-01T00:00:00Z");
    let listed = c.all("/v3/clusterroletemplatebindings?userId=u-bob01").await;
    assert!(
        listed
            .iter()
            .any(|b| b["id"] == id.as_str() && b["labels"]["apono.io/managed"] == "true"),
        "lists show the labels too"
    );

    // A PUT's map replaces the object's (norman `mergeProtected`): keys left out are gone; a
    // body without `labels` leaves them alone.
    let (status, updated) = c
        .put(
            &path,
            json!({"annotations": {"apono.io/grants": "g-1,g-2", "apono.io/expires-at": "2030-01-01T00:00:00Z"}}),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["annotations"]["apono.io/grants"], "g-1,g-2");
    assert!(
        updated["annotations"].get("apono.io/grant").is_none(),
        "left out, so removed: {updated}"
    );
    assert_eq!(updated["annotations"]["apono.io/expires-at"], "2030-01-01T00:00:00Z");
    assert_eq!(updated["labels"]["apono.io/managed"], "true", "labels untouched");
    let sim =
        c.h.sim
            .bindings()
            .into_iter()
            .find(|b| b.id == id)
            .expect("in Sim::bindings");
    assert_eq!(
        sim.annotations.get("apono.io/grants").map(String::as_str),
        Some("g-1,g-2")
    );
    assert_eq!(sim.labels.get("apono.io/managed").map(String::as_str), Some("true"));

    // Sending back the object as read is fine; changing what it grants is not.
    let (status, _) = c.put(&path, read.clone()).await;
    assert_eq!(status, 200);
    for (field, value) in [
        ("roleTemplateId", "cluster-owner"),
        ("clusterId", "local"),
        ("userId", "u-alice1"),
    ] {
        let refused = c.put(&path, json!({ field: value })).await;
        assert_error(&refused, 400, "BadRequest");
        assert!(
            refused.1["message"]
                .as_str()
                .unwrap_or_default()
                .contains("field is immutable"),
            "{}",
            refused.1
        );
    }
    let (_, after) = c.get(&path).await;
    assert_eq!(after["roleTemplateId"], "cluster-member");
    assert_eq!(after["userId"], "u-bob01");
    assert_error(
        &c.put(
            "/v3/clusterroletemplatebindings/c-7x2k9:crtb-nope1",
            json!({"labels": {}}),
        )
        .await,
        404,
        "NotFound",
    );

    // A binding planted out of band keeps what it was given: a person's (no labels) ...
    c.h.sim
        .add_binding(SimBinding {
            id: "c-7x2k9:crtb-stand".into(),
            name: "crtb-stand".into(),
            scope: BindingScope::Cluster,
            role_id: "cluster-member".into(),
            resource_id: "c-7x2k9".into(),
            user_id: Some("u-alice1".into()),
            user_principal_id: Some("local://u-alice1".into()),
            group_principal_id: None,
            labels: BTreeMap::from([("team".to_string(), "payments".to_string())]),
            annotations: BTreeMap::new(),
        })
        .expect("planted");
    let (_, planted) = c.get("/v3/clusterroletemplatebindings/c-7x2k9:crtb-stand").await;
    assert_eq!(planted["labels"]["team"], "payments");
    assert_eq!(planted["annotations"], json!({}));
    let raw: Vec<SimBinding> = reqwest::get(format!("{}/sim/bindings", c.h.base_url))
        .await
        .expect("sim bindings")
        .json()
        .await
        .expect("json");
    assert!(
        raw.iter()
            .any(|b| b.id == id && b.labels.contains_key("apono.io/managed"))
    );
    c.stop().await;
}

/// Rancher filters lists by the caller's RBAC without a word (rancher/norman
/// `store/proxy/proxy_store.go` `FilterList`, rancher `pkg/rbac/user_based.go`); one object is
/// read and written as the caller (`doAuthed`, Kubernetes RBAC: 403 Forbidden); creates are
/// refused by Norman's schema check (rancher/norman `authorization/all.go`: PermissionDenied).
#[tokio::test]
async fn a_key_owner_who_is_not_admin_gets_lists_filtered_silently() {
    let admin_probe = format!("/v3/globalrolebindings?userId={ADMIN_USER_ID}&globalRoleId=admin");
    let c = Client::start(SimOptions::default()).await;
    assert_eq!(
        c.ids(&admin_probe).await,
        ["grb-admin"],
        "a default key belongs to an admin"
    );
    c.stop().await;

    let c = Client::start(SimOptions {
        key_owner_admin: false,
        ..SimOptions::default()
    })
    .await;
    assert!(c.ids(&admin_probe).await.is_empty(), "no admin binding to be seen");
    assert_eq!(c.ids("/v3/globalrolebindings").await, ["grb-owner"], "only its own");
    assert_eq!(c.ids("/v3/users").await, [ADMIN_USER_ID]);
    assert_eq!(c.ids("/v3/users?username=bob").await, Vec::<String>::new());
    assert_eq!(c.ids("/v3/users?me=true").await, [ADMIN_USER_ID]);
    for path in [
        "/v3/clusterroletemplatebindings",
        "/v3/projectroletemplatebindings?userId=u-bob01",
        "/v3/clusters",
        "/v3/projects",
        "/v3/cluster/c-7x2k9/namespaces",
    ] {
        let (status, page) = c.get(path).await;
        assert_eq!(status, 200, "no error says anything was hidden: {page}");
        assert_eq!(page["data"], json!([]), "{path}");
        assert_eq!(page["pagination"]["total"], 0, "{path}");
    }
    assert!(c.ids("/v3/globalroles").await.contains(&"admin".to_string()));
    assert!(c.ids("/v3/roletemplates").await.contains(&"cluster-member".to_string()));

    assert_error(&c.get("/v3/users/u-bob01").await, 403, "Forbidden");
    let (status, me) = c.get(&format!("/v3/users/{ADMIN_USER_ID}")).await;
    assert_eq!((status, me["id"].as_str()), (200, Some(ADMIN_USER_ID)));
    let other = "/v3/projectroletemplatebindings/p-abcde:prtb-b0b01";
    let read = c.get(other).await;
    assert_error(&read, 403, "Forbidden");
    assert!(
        read.1["message"].as_str().unwrap_or_default().contains("cannot get"),
        "{}",
        read.1
    );
    assert_error(&c.delete(other).await, 403, "Forbidden");
    assert_error(&c.put(other, json!({"labels": {}})).await, 403, "Forbidden");
    let create = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-bob01", "cluster-member", "c-7x2k9"),
        )
        .await;
    assert_error(&create, 403, "PermissionDenied");
    assert_eq!(create.1["message"], "can not create clusterRoleTemplateBinding");
    assert_error(
        &c.post(
            "/v3/users",
            json!({"username": "carol", "password": "long-enough-password"}),
        )
        .await,
        403,
        "PermissionDenied",
    );
    assert_error(
        &c.put("/v3/users/u-bob01", json!({"enabled": false})).await,
        403,
        "Forbidden",
    );
    assert_error(&c.delete("/v3/users/u-bob01").await, 403, "Forbidden");
    assert!(
        c.h.sim.bindings().iter().any(|b| b.id == "p-abcde:prtb-b0b01"),
        "nothing was deleted"
    );
    assert!(c.h.sim.users().iter().all(|u| u.enabled));

    // Its own bindings reach what it may see: a project membership shows that project only.
    c.h.sim
        .add_binding(SimBinding {
            id: "p-x4m7q:prtb-own01".into(),
            name: "prtb-own01".into(),
            scope: BindingScope::Project,
            role_id: "project-member".into(),
            resource_id: "c-7x2k9:p-x4m7q".into(),
            user_id: Some(ADMIN_USER_ID.into()),
            user_principal_id: Some(format!("local://{ADMIN_USER_ID}")),
            group_principal_id: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        })
        .expect("planted");
    assert_eq!(c.ids("/v3/projectroletemplatebindings").await, ["p-x4m7q:prtb-own01"]);
    assert_eq!(c.ids("/v3/clusters").await, ["c-7x2k9"]);
    assert_eq!(c.ids("/v3/projects").await, ["c-7x2k9:p-x4m7q"]);
    assert_eq!(
        c.ids("/v3/cluster/c-7x2k9/namespaces").await,
        ["payments-api", "payments-db"]
    );

    // Made admin again, it sees everything.
    c.h.sim.set_key_owner_admin(true);
    assert_eq!(c.ids(&admin_probe).await.len(), 1);
    assert_eq!(c.ids("/v3/users").await.len(), 4);
    assert!(c.ids("/v3/clusterroletemplatebindings").await.len() >= 2);
    let (status, _) = c.get(other).await;
    assert_eq!(status, 200);
    c.h.sim.set_key_owner_admin(false);
    assert!(c.ids(&admin_probe).await.is_empty());
    c.stop().await;
}

/// An RBAC-filtered or lagging listing (rancher-api-notes §6: "an empty listing proves
/// nothing"; informer caches behind Norman's lists) while the object is there: lists are
/// empty or miss one binding, reads by id and deletes still work.
#[tokio::test]
async fn lists_can_come_back_empty_or_miss_one_object_that_is_still_there() {
    let c = Client::start(SimOptions::default()).await;
    let route = "GET /v3/clusterroletemplatebindings";
    let list = "/v3/clusterroletemplatebindings";
    let all = c.ids(list).await;
    assert_eq!(all, ["c-7x2k9:crtb-grp01", "local:crtb-al1ce"]);

    c.h.sim.empty_lists_on(route, 1);
    let (status, page) = c.get(list).await;
    assert_eq!(status, 200);
    assert_eq!(
        (page["data"].clone(), page["pagination"]["total"].clone()),
        (json!([]), json!(0))
    );
    assert_eq!(c.ids(list).await, all, "one request only");

    c.h.sim.empty_lists_on(route, usize::MAX);
    for _ in 0..3 {
        assert!(c.ids(list).await.is_empty());
    }
    assert_eq!(c.get("/v3/clusterroletemplatebindings/local:crtb-al1ce").await.0, 200);
    assert_eq!(
        c.ids("/v3/projectroletemplatebindings").await.len(),
        1,
        "other routes whole"
    );
    c.h.sim.clear_list_faults();
    assert_eq!(c.ids(list).await, all);

    c.h.sim.hide_from_lists("local:crtb-al1ce");
    assert_eq!(c.ids(list).await, ["c-7x2k9:crtb-grp01"]);
    assert!(
        c.ids("/v3/clusterroletemplatebindings?userId=u-alice1")
            .await
            .is_empty()
    );
    let path = "/v3/clusterroletemplatebindings/local:crtb-al1ce";
    assert_eq!(c.get(path).await.0, 200, "readable by id");
    assert!(c.h.sim.unhide("local:crtb-al1ce"));
    assert_eq!(c.ids(list).await, all);
    c.h.sim.hide_from_lists("local:crtb-al1ce");
    assert_eq!(c.delete(path).await.0, 200, "deletable");
    assert_error(&c.get(path).await, 404, "NotFound");
    c.stop().await;
}

/// A slow Rancher (rancher-api-notes §6: a disconnected cluster's requests wait 20-40 s) still
/// carries out a change after the client has stopped waiting for the answer.
#[tokio::test]
async fn a_slow_delete_is_applied_even_after_the_client_gave_up() {
    let c = Client::start(SimOptions::default()).await;
    let path = "/v3/clusterroletemplatebindings/local:crtb-al1ce";
    c.h.sim
        .slow_next_on("DELETE /v3/clusterroletemplatebindings/{id}", 1, Duration::from_secs(2));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .expect("client");
    let gave_up = impatient
        .delete(c.url(path))
        .header("Authorization", &c.auth)
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()), "the client timed out");
    assert_eq!(c.get(path).await.0, 200, "not yet applied while the server is slow");
    wait_for_404(&c, path).await;
    assert!(c.h.sim.bindings().iter().all(|b| b.id != "local:crtb-al1ce"));
    assert_eq!(c.h.sim.stats().route("DELETE /v3/clusterroletemplatebindings/{id}"), 1);
    c.stop().await;
}

/// A refused login binding: Norman's PermissionDenied shape (rancher/norman
/// `httperror/handler/handler.go`; webhook escalation refusals pass through as 403 too).
#[tokio::test]
async fn a_403_on_the_login_binding_has_the_norman_shape_and_creates_nothing() {
    let c = Client::start(SimOptions::default()).await;
    c.h.sim.fail_next_on("POST /v3/globalrolebindings", 1, 403, false);
    let body = json!({"globalRoleId": "user-base", "userId": "u-bob01"});
    let refused = c.post("/v3/globalrolebindings", body.clone()).await;
    assert_error(&refused, 403, "PermissionDenied");
    assert!(refused.1["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(
        c.h.sim
            .bindings()
            .iter()
            .all(|b| !(b.role_id == "user-base" && b.user_id.as_deref() == Some("u-bob01")))
    );
    let (status, _) = c.post("/v3/globalrolebindings", body).await;
    assert_eq!(status, 201, "one request only");
    c.stop().await;
}

/// A default install's global roles (rancher `pkg/data/management/role_data.go`): `user` is the
/// new-user default, `user-base` is login only; the install may switch `newUserDefault`.
#[tokio::test]
async fn global_roles_show_new_user_default_as_a_default_install_has_it() {
    let c = Client::start(SimOptions::default()).await;
    let roles = c.all("/v3/globalroles").await;
    let flag = |id: &str| {
        roles
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| r["newUserDefault"].clone())
    };
    assert_eq!(flag("user"), Some(json!(true)));
    assert_eq!(flag("user-base"), Some(json!(false)));
    assert_eq!(flag("admin"), Some(json!(false)));
    assert_eq!(flag("restricted-admin"), Some(json!(false)));
    assert_eq!(c.ids("/v3/globalroles?newUserDefault=true").await, ["user"]);

    assert!(c.h.sim.set_new_user_default("user-base", true));
    assert!(c.h.sim.set_new_user_default("user", false));
    assert!(!c.h.sim.set_new_user_default("no-such-role", true));
    assert_eq!(c.ids("/v3/globalroles?newUserDefault=true").await, ["user-base"]);
    c.stop().await;
}

/// Disabling a user: `PUT /v3/users/{id}` with `enabled: false` (rancher-api-notes §1, §6).
#[tokio::test]
async fn a_user_is_disabled_and_enabled_again_by_put() {
    let c = Client::start(SimOptions::default()).await;
    let (status, off) = c.put("/v3/users/u-bob01", json!({"enabled": false})).await;
    assert_eq!(status, 200, "{off}");
    assert_eq!(
        (off["enabled"].clone(), off["state"].clone()),
        (json!(false), json!("inactive"))
    );
    assert_eq!(c.get("/v3/users/u-bob01").await.1["enabled"], false);
    let enabled = |sim: &Sim| sim.users().iter().find(|u| u.id == "u-bob01").map(|u| u.enabled);
    assert_eq!(enabled(&c.h.sim), Some(false));
    assert!(
        c.h.sim.check_password("u-bob01", "bob-sim-password-0001"),
        "password kept"
    );
    let (status, on) = c.put("/v3/users/u-bob01", json!({"enabled": true})).await;
    assert_eq!(status, 200);
    assert_eq!(
        (on["enabled"].clone(), on["state"].clone()),
        (json!(true), json!("active"))
    );
    assert_eq!(enabled(&c.h.sim), Some(true));
    c.stop().await;
}

// ----- issue 10: the simulator tells the truth (review rancher.md §2) -----

/// S1: a disconnected cluster's namespaces wait in Rancher's dialer (`pkg/dialer/factory.go`:
/// four tries with a jittered 5 s sleep, then `ErrAgentDisconnected`) and answer 500
/// `ServerError` "cluster agent disconnected" (a plain Go error, which rancher/norman
/// `httperror/handler/handler.go` turns into a 500). The cluster stays listed and readable;
/// other clusters answer meanwhile.
#[tokio::test]
async fn a_disconnected_cluster_stalls_then_answers_500_and_stays_listed() {
    let stall = Duration::from_millis(300);
    let c = Client::start(SimOptions {
        disconnect_stall: stall,
        ..SimOptions::default()
    })
    .await;
    assert!(c.h.sim.disconnect_cluster("c-7x2k9", true));
    assert!(!c.h.sim.disconnect_cluster("c-nope", true));
    assert_eq!(c.h.sim.disconnected_clusters(), ["c-7x2k9"]);

    let t = Instant::now();
    let (dead, alive) = tokio::join!(
        async {
            let answer = c.get("/v3/cluster/c-7x2k9/namespaces").await;
            (answer, t.elapsed())
        },
        async {
            let answer = c.get("/v3/cluster/c-m-4bq8z2lp/namespaces").await;
            (answer, t.elapsed())
        }
    );
    let ((dead, dead_at), (alive, alive_at)) = (dead, alive);
    assert_error(&dead, 500, "ServerError");
    assert_eq!(dead.1["message"], "cluster agent disconnected");
    assert!(dead_at >= stall, "{dead_at:?}");
    assert_eq!(alive.0, 200);
    assert!(alive_at < dead_at, "the other cluster is not held up");
    assert_error(
        &c.get("/v3/cluster/c-7x2k9/namespaces/default").await,
        500,
        "ServerError",
    );
    assert!(c.ids("/v3/clusters").await.contains(&"c-7x2k9".to_string()));
    assert_eq!(c.get("/v3/clusters/c-7x2k9").await.0, 200);
    assert_eq!(
        c.ids("/v3/projects?clusterId=c-7x2k9").await.len(),
        2,
        "management data is local"
    );

    // A wrong key is refused by authentication, before any dialing.
    let refused = c
        .send(
            c.http
                .get(c.url("/v3/cluster/c-7x2k9/namespaces"))
                .header("Authorization", "Bearer token-sim01:wrong"),
        )
        .await;
    assert_eq!(refused.0, 401);

    assert!(c.h.sim.disconnect_cluster("c-7x2k9", false));
    assert_eq!(c.ids("/v3/cluster/c-7x2k9/namespaces").await.len(), 5);
    assert!(c.h.sim.disconnected_clusters().is_empty());
    c.stop().await;
}

/// `disconnected_share` picks that share of the clusters other than `local` by the seed: the same
/// clusters for the same seed (the benchmark's fleet with 5 % down), others for another seed.
#[test]
fn a_share_of_the_large_fleet_is_disconnected_by_seed() {
    let fleet = |seed: u64| {
        Sim::new(SimOptions {
            size: DatasetSize::Large,
            disconnected_share: 0.05,
            seed,
            ..SimOptions::default()
        })
        .disconnected_clusters()
    };
    let down = fleet(7);
    assert_eq!(down.len(), 10, "5 % of the 199 downstream clusters");
    assert!(!down.contains(&"local".to_string()));
    assert_eq!(fleet(7), down, "deterministic");
    assert_ne!(fleet(8), down, "another seed, other clusters");
    let none = Sim::new(SimOptions {
        size: DatasetSize::Large,
        ..SimOptions::default()
    });
    assert!(none.disconnected_clusters().is_empty());
}

/// S10: filters as rancher/norman parses them (`parse/collection.go` parseNameAndOp splits the key
/// on its last `_`; `types/reflection.go` setupFilters gives strings and references
/// `eq`/`ne`/`in`/`notin` and booleans `eq`/`ne`; `types/condition.go`: `eq` compares the first
/// value). `_null`/`_notnull` are given to no field: ignored, the list comes back unfiltered.
#[tokio::test]
async fn filters_parse_as_norman_does() {
    let c = Client::start(SimOptions::default()).await;
    let all_crtbs = c.ids("/v3/clusterroletemplatebindings").await;
    assert_eq!(all_crtbs.len(), 2);
    for ignored in [
        "userId_null=true",
        "userId_notnull=true",
        "groupPrincipalId_null=",
        "userId_gt=a",
        "user_Id=u-alice1",
    ] {
        assert_eq!(
            c.ids(&format!("/v3/clusterroletemplatebindings?{ignored}")).await,
            all_crtbs,
            "{ignored}"
        );
    }
    assert_eq!(
        c.ids("/v3/clusterroletemplatebindings?userId_notin=u-alice1").await,
        ["c-7x2k9:crtb-grp01"],
        "split on the last _"
    );
    assert_eq!(
        c.ids("/v3/clusterroletemplatebindings?groupPrincipalId_ne=github_team://777")
            .await,
        ["local:crtb-al1ce"]
    );
    assert_eq!(c.ids("/v3/clusters?name_eq=prod-eu").await, ["c-7x2k9"]);
    assert_eq!(
        c.ids("/v3/users?username=alice&username=bob").await,
        ["u-alice1"],
        "eq takes the first value"
    );
    assert_eq!(
        c.ids("/v3/users?username_in=alice&username_in=bob").await,
        ["u-alice1", "u-bob01"]
    );
    // Booleans: eq and ne only.
    let templates = c.ids("/v3/roletemplates").await.len();
    assert_eq!(c.ids("/v3/roletemplates?locked_in=true").await.len(), templates);
    assert_eq!(c.ids("/v3/roletemplates?locked=true").await, ["rt-lock1"]);
    assert_eq!(c.ids("/v3/roletemplates?locked_ne=false").await, ["rt-lock1"]);
    assert_eq!(c.ids("/v3/users?enabled=false").await.len(), 0);
    // The answer echoes only the conditions it applied.
    let (_, page) = c.get("/v3/users?username_null=1&username_ne=bob").await;
    assert_eq!(page["filters"]["username"], json!([{"modifier": "ne", "value": "bob"}]));
    c.stop().await;
}

/// S12: `POST /v3/users` creates the User, then its password Secret (rancher
/// `pkg/auth/api/user/user_store.go` Create): when the second step fails the answer is a 500 while
/// the user exists without a password; a retry of the same POST is then 422 NotUnique.
#[tokio::test]
async fn a_user_create_can_fail_after_the_user_exists() {
    let c = Client::start(SimOptions::default()).await;
    c.h.sim.fail_user_password_next(1);
    let body = json!({"username": "erin", "password": "long-enough-pw-1", "name": "Erin"});
    let failed = c.post("/v3/users", body.clone()).await;
    assert_error(&failed, 500, "ServerError");
    let erin =
        c.h.sim
            .users()
            .into_iter()
            .find(|u| u.username.as_deref() == Some("erin"))
            .expect("the user exists");
    assert!(!erin.password_set, "no password was stored");
    assert!(!failed.1.to_string().contains("long-enough-pw-1"), "{}", failed.1);
    assert_eq!(c.ids("/v3/users?username=erin").await, std::slice::from_ref(&erin.id));
    let again = c.post("/v3/users", body).await;
    assert_error(&again, 422, "NotUnique");
    // Setting the password finishes the user; the fault was for one create only.
    let path = format!("/v3/users/{}?action=setpassword", erin.id);
    assert_eq!(c.post(&path, json!({"newPassword": "long-enough-pw-2"})).await.0, 200);
    assert!(c.h.sim.check_password(&erin.id, "long-enough-pw-2"));
    let (status, frank) = c
        .post(
            "/v3/users",
            json!({"username": "frank", "password": "long-enough-pw-3"}),
        )
        .await;
    assert_eq!(status, 201, "{frank}");
    c.stop().await;
}

/// N5: Norman's PUT (rancher/norman `types/convert/merge/merge.go` `mergeProtected`) *replaces*
/// the object's `labels`/`annotations` with the body's: keys left out are deleted, except
/// protected ones (containing `cattle.io/`) and `field.cattle.io/` ones, which also cannot be set
/// this way; a body without the map leaves it alone. The same on every version.
#[tokio::test]
async fn a_put_replaces_label_and_annotation_maps_but_keeps_protected_keys() {
    for minor in [10, 12, 13] {
        let c = Client::start(version(minor)).await;
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        c.h.sim
            .add_binding(SimBinding {
                id: "c-7x2k9:crtb-put01".into(),
                name: "crtb-put01".into(),
                scope: BindingScope::Cluster,
                role_id: "cluster-member".into(),
                resource_id: "c-7x2k9".into(),
                user_id: Some("u-bob01".into()),
                user_principal_id: None,
                group_principal_id: None,
                labels: labels(&[
                    ("team", "x"),
                    ("keep", "me"),
                    ("authz.management.cattle.io/grb-owner", "grb-1"),
                    ("field.cattle.io/projectId", "p-1"),
                ]),
                annotations: labels(&[("apono.io/expires-at", "2030-01-01T00:00:00Z")]),
            })
            .expect("planted");
        let path = "/v3/clusterroletemplatebindings/c-7x2k9:crtb-put01";
        let (code, put) = c
            .put(path, json!({"labels": {"team": "y", "cattle.io/new": "z"}}))
            .await;
        assert_eq!(code, 200, "2.{minor}: {put}");
        assert_eq!(
            put["labels"],
            json!({"team": "y", "authz.management.cattle.io/grb-owner": "grb-1", "field.cattle.io/projectId": "p-1"}),
            "2.{minor}: `keep` left out, so gone; protected keys neither removed nor added"
        );
        assert_eq!(
            put["annotations"],
            json!({"apono.io/expires-at": "2030-01-01T00:00:00Z"}),
            "2.{minor}: no `annotations` in the body: untouched"
        );
        // An empty map clears what is not protected; a null one is no map at all.
        let (_, put) = c.put(path, json!({"annotations": {}, "labels": null})).await;
        assert_eq!(put["annotations"], json!({}), "2.{minor}");
        assert_eq!(put["labels"]["team"], "y", "2.{minor}");
        let stored = c.h.sim.bindings().into_iter().find(|b| b.id == "c-7x2k9:crtb-put01");
        assert_eq!(stored.map(|b| b.labels.len()), Some(3), "2.{minor}");
        // Users follow the same rule.
        c.put("/v3/users/u-bob01", json!({"labels": {"a": "1"}})).await;
        let (_, user) = c.put("/v3/users/u-bob01", json!({"labels": {"b": "2"}})).await;
        assert_eq!(user["labels"], json!({"b": "2"}), "2.{minor}");
        c.stop().await;
    }
}

fn planted_grb(id: &str, role: &str, user: Option<&str>, group: Option<&str>) -> SimBinding {
    SimBinding {
        id: id.into(),
        name: id.into(),
        scope: BindingScope::Global,
        role_id: role.into(),
        resource_id: "global".into(),
        user_id: user.map(str::to_string),
        user_principal_id: None,
        group_principal_id: group.map(str::to_string),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    }
}

/// `GET /v3/principals` answers the token's user principal and the groups its provider reports
/// (`pkg/auth/principals/handler.go` list). A GRB of `admin` to one of those groups makes the
/// key's owner an admin with no GRB of its own (Rancher binds the group's ClusterRole), so its
/// lists are whole; without the group they are filtered again.
#[tokio::test]
async fn the_owners_principals_include_its_groups_and_a_group_grb_makes_it_an_admin() {
    let admin_probe = format!("/v3/globalrolebindings?userId={ADMIN_USER_ID}&globalRoleId=admin");
    for minor in [10, 12, 13] {
        let c = Client::start(version(minor)).await;
        let all_users = c.ids("/v3/users").await.len();
        assert!(c.h.sim.set_user_groups(
            ADMIN_USER_ID,
            vec!["github_team://777".into(), "okta_group://ops".into()]
        ));
        assert!(!c.h.sim.set_user_groups("u-nobody", Vec::new()));
        let (_, mine) = c.get("/v3/principals").await;
        let principals: Vec<(Value, Value, Value)> = mine["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| (p["id"].clone(), p["principalType"].clone(), p["memberOf"].clone()))
            .collect();
        assert_eq!(
            principals,
            [
                (json!(format!("local://{ADMIN_USER_ID}")), json!("user"), json!(false)),
                (json!("github_team://777"), json!("group"), json!(true)),
                (json!("okta_group://ops"), json!("group"), json!(true)),
            ],
            "2.{minor}"
        );

        c.h.sim
            .add_binding(planted_grb("grb-team-admin", "admin", None, Some("github_team://777")))
            .expect("planted");
        c.h.sim.set_key_owner_admin(false);
        assert!(
            c.ids(&admin_probe).await.is_empty(),
            "2.{minor}: no admin GRB of its own"
        );
        assert!(c.h.sim.is_admin(ADMIN_USER_ID), "2.{minor}: admin through its group");
        assert_eq!(c.ids("/v3/users").await.len(), all_users, "2.{minor}: lists are whole");
        let team_grbs = c.ids("/v3/globalrolebindings?groupPrincipalId=github_team://777").await;
        assert_eq!(team_grbs, ["grb-team-admin"], "2.{minor}");

        c.h.sim.set_user_groups(ADMIN_USER_ID, Vec::new());
        assert!(!c.h.sim.is_admin(ADMIN_USER_ID), "2.{minor}");
        assert_eq!(c.ids("/v3/users").await, [ADMIN_USER_ID], "2.{minor}: filtered again");
        c.stop().await;
    }
}

/// Global roles carry `rules`; Rancher treats any global role whose rules are the built-in
/// admin's (`*` on `*` in `*`, and the `*` non-resource URL) as admin (`IsAdminGlobalRole`,
/// `pkg/rbac/common.go`), and no other.
#[tokio::test]
async fn a_custom_global_role_with_the_admin_rules_makes_its_holder_an_admin() {
    let c = Client::start(SimOptions::default()).await;
    let (_, admin) = c.get("/v3/globalroles/admin").await;
    assert_eq!(
        admin["rules"],
        json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ])
    );
    c.h.sim.add_global_role("gr-clone", PolicyRule::admin()).expect("new");
    c.h.sim
        .add_global_role("gr-almost", vec![PolicyRule::on(&["*"], &["*"], &["*"])])
        .expect("new");
    assert!(c.h.sim.add_global_role("admin", Vec::new()).is_err());
    let (_, clone) = c.get("/v3/globalroles/gr-clone").await;
    assert_eq!(
        (clone["builtin"].clone(), clone["rules"].clone()),
        (json!(false), admin["rules"].clone())
    );

    c.h.sim.set_key_owner_admin(false);
    assert!(!c.h.sim.is_admin(ADMIN_USER_ID));
    c.h.sim
        .add_binding(planted_grb("grb-almost", "gr-almost", Some(ADMIN_USER_ID), None))
        .expect("planted");
    assert!(!c.h.sim.is_admin(ADMIN_USER_ID), "no non-resource rule: not an admin");
    assert_eq!(c.ids("/v3/users").await, [ADMIN_USER_ID]);
    c.h.sim
        .add_binding(planted_grb("grb-clone", "gr-clone", Some(ADMIN_USER_ID), None))
        .expect("planted");
    assert!(c.h.sim.is_admin(ADMIN_USER_ID));
    assert!(c.ids("/v3/users").await.len() > 1, "an admin's lists are whole");
    // Taking the owner's admin away removes its own GRBs of every admin role.
    c.h.sim.set_key_owner_admin(false);
    assert!(!c.h.sim.is_admin(ADMIN_USER_ID));
    assert!(c.h.sim.bindings().iter().all(|b| b.id != "grb-clone"));
    c.stop().await;
}

/// `SelfSubjectAccessReview` through Rancher's proxy (`/k8s/clusters/{id}`): on `local` the
/// owner's rules are those of its global roles, its groups' included (a ClusterRole per global
/// role); downstream only an admin may do everything.
#[tokio::test]
async fn an_access_review_answers_from_the_owners_global_roles() {
    let c = Client::start(SimOptions::default()).await;
    let review = async |cluster: &str, attrs: Value| {
        let key = if attrs.get("path").is_some() {
            "nonResourceAttributes"
        } else {
            "resourceAttributes"
        };
        let path = format!("/k8s/clusters/{cluster}/apis/authorization.k8s.io/v1/selfsubjectaccessreviews");
        c.post(
            &path,
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {key: attrs}}),
        )
        .await
    };
    let everything = json!({"verb": "*", "group": "*", "resource": "*"});
    let urls = json!({"verb": "*", "path": "*"});
    let clusters_create = json!({"verb": "create", "group": "management.cattle.io", "resource": "clusters"});
    let allowed = |answer: &(u16, Value)| {
        assert_eq!(answer.0, 201, "{}", answer.1);
        assert_eq!(answer.1["kind"], "SelfSubjectAccessReview", "{}", answer.1);
        answer.1["status"]["allowed"].as_bool().unwrap_or_default()
    };
    assert!(allowed(&review("local", everything.clone()).await));
    assert!(allowed(&review("local", urls.clone()).await));
    assert!(allowed(&review("c-7x2k9", everything.clone()).await));

    c.h.sim.set_key_owner_admin(false); // left with `user`
    assert!(!allowed(&review("local", everything.clone()).await));
    assert!(!allowed(&review("local", urls.clone()).await));
    assert!(
        allowed(&review("local", clusters_create).await),
        "the `user` role's own rule"
    );
    assert!(!allowed(&review("c-7x2k9", everything.clone()).await));

    c.h.sim.set_user_groups(ADMIN_USER_ID, vec!["github_team://888".into()]);
    c.h.sim
        .add_binding(planted_grb("grb-sre-admin", "admin", None, Some("github_team://888")))
        .expect("planted");
    assert!(allowed(&review("local", everything).await), "admin through its group");
    assert!(allowed(&review("local", urls).await));
    let bad = c
        .post(
            "/k8s/clusters/local/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            json!({"spec": {}}),
        )
        .await;
    assert_eq!(bad.0, 400, "{}", bad.1);
    c.stop().await;
}

/// The simulator's clock (`Sim::set_clock_offset`) is what its `Date` header says, what the key's
/// expiry is judged by, and what new objects are stamped with.
#[tokio::test]
async fn the_clock_offset_moves_the_date_header_the_keys_expiry_and_new_objects() {
    let c = Client::start(SimOptions::default()).await;
    let date = |resp: &reqwest::Response| -> chrono::DateTime<chrono::Utc> {
        let raw = resp
            .headers()
            .get("date")
            .and_then(|d| d.to_str().ok())
            .unwrap_or_default()
            .to_string();
        chrono::DateTime::parse_from_rfc2822(&raw)
            .unwrap_or_else(|e| panic!("Date {raw:?}: {e}"))
            .with_timezone(&chrono::Utc)
    };
    let me = || {
        c.http
            .get(c.url("/v3/users?me=true"))
            .header("Authorization", &c.auth)
            .send()
    };
    let hours = |h: i64| chrono::Duration::hours(h);
    // Within a minute of the expected hour, whatever this machine's speed.
    let near =
        |t: chrono::DateTime<chrono::Utc>, want: chrono::DateTime<chrono::Utc>| (t - want).num_minutes().abs() <= 1;

    let resp = me().await.expect("answer");
    assert!(near(date(&resp), chrono::Utc::now()), "no offset: this machine's time");
    c.h.sim.set_key_expiry(Some(chrono::Utc::now() + hours(1)));
    c.h.sim.set_clock_offset(hours(2));
    let resp = me().await.expect("answer");
    assert_eq!(resp.status().as_u16(), 401, "the key expired on the simulator's clock");
    assert!(near(date(&resp), chrono::Utc::now() + hours(2)));
    let stats = reqwest::get(c.url("/sim/stats")).await.expect("answer");
    assert!(near(date(&stats), chrono::Utc::now() + hours(2)), "every answer");

    c.h.sim.set_clock_offset(hours(-3));
    let resp = me().await.expect("answer");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(near(date(&resp), chrono::Utc::now() - hours(3)));
    let (_, made) = c
        .post(
            "/v3/clusterroletemplatebindings",
            crtb("u-bob01", "cluster-member", "c-7x2k9"),
        )
        .await;
    let created = chrono::DateTime::parse_from_rfc3339(made["created"].as_str().unwrap_or_default())
        .expect("created")
        .with_timezone(&chrono::Utc);
    assert!(near(created, chrono::Utc::now() - hours(3)), "{created}");
    assert!(near(c.h.sim.now(), chrono::Utc::now() - hours(3)));
    c.stop().await;
}

/// Listings filtered by an exact resource and role come from the index: the same bindings, in
/// the same order, as filtering the whole collection, before and after a create and a delete.
#[tokio::test]
async fn indexed_binding_listings_match_a_full_scan_through_creates_and_deletes() {
    let c = Client::start(SimOptions::default()).await;
    async fn check(c: &Client) {
        let all = c.all("/v3/clusterroletemplatebindings").await;
        let mut keys: Vec<(String, String)> = all
            .iter()
            .map(|b| {
                (
                    b["clusterId"].as_str().unwrap().to_string(),
                    b["roleTemplateId"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        keys.push(("c-7x2k9".into(), "no-such-role".into()));
        for (cluster, role) in keys {
            let expected: Vec<&str> = all
                .iter()
                .filter(|b| b["clusterId"] == cluster.as_str() && b["roleTemplateId"] == role.as_str())
                .map(|b| b["id"].as_str().unwrap())
                .collect();
            let got = c
                .ids(&format!(
                    "/v3/clusterroletemplatebindings?clusterId={cluster}&roleTemplateId={role}"
                ))
                .await;
            assert_eq!(got, expected, "{cluster} {role}");
            let by_cluster = c
                .ids(&format!("/v3/clusterroletemplatebindings?clusterId={cluster}"))
                .await;
            let expected: Vec<&str> = all
                .iter()
                .filter(|b| b["clusterId"] == cluster.as_str())
                .map(|b| b["id"].as_str().unwrap())
                .collect();
            assert_eq!(by_cluster, expected, "{cluster}");
        }
    }
    check(&c).await;
    let mut body = crtb("u-bob01", "cluster-member", "c-7x2k9");
    body["name"] = json!("crtb-indexed");
    let (status, created) = c.post("/v3/clusterroletemplatebindings", body).await;
    assert_eq!(status, 201, "{created}");
    let listed = c
        .ids("/v3/clusterroletemplatebindings?clusterId=c-7x2k9&roleTemplateId=cluster-member")
        .await;
    assert!(listed.contains(&"c-7x2k9:crtb-indexed".to_string()), "{listed:?}");
    check(&c).await;
    let (status, _) = c
        .send(
            c.http
                .delete(c.url("/v3/clusterroletemplatebindings/c-7x2k9:crtb-indexed"))
                .header("Authorization", &c.auth),
        )
        .await;
    assert!(status < 300);
    let listed = c
        .ids("/v3/clusterroletemplatebindings?clusterId=c-7x2k9&roleTemplateId=cluster-member")
        .await;
    assert!(!listed.contains(&"c-7x2k9:crtb-indexed".to_string()), "{listed:?}");
    check(&c).await;
    c.stop().await;
}
