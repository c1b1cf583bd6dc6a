//! The simulator's datasets. The small one has fixed ids that tests depend on; the large one is
//! the small one plus generated objects (deterministic for a seed, built in well under a second in
//! release).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};

use super::store::{Binding, Cluster, GlobalRole, Namespace, Principal, Project, Rng, RoleTemplate, State, User};
use super::{ADMIN_USER_ID, DatasetSize, PolicyRule, SimOptions, external_user_id};
use crate::integrations::BindingScope;

/// When the seeded objects were "created".
pub(crate) fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 9, 0, 0)
        .single()
        .unwrap_or_else(Utc::now)
}

fn at(minutes: i64) -> DateTime<Utc> {
    base_time() + ChronoDuration::minutes(minutes)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub(crate) fn build(options: &SimOptions) -> State {
    let mut st = State {
        version: options.version,
        settle: options.settle,
        controller_delay: options.controller_delay,
        pending: Vec::new(),
        remote_pending: Vec::new(),
        groups: BTreeMap::new(),
        clock_offset: chrono::Duration::zero(),
        disconnected: BTreeSet::new(),
        disconnect_stall: options.disconnect_stall,
        fail_user_password: 0,
        removal_delay: options.removal_delay,
        lingering: 0,
        resolve_external: options.resolve_external_principals,
        password_min_length: options.password_min_length,
        clusters: BTreeMap::new(),
        projects: BTreeMap::new(),
        namespaces: BTreeMap::new(),
        global_roles: BTreeMap::new(),
        role_templates: BTreeMap::new(),
        users: BTreeMap::new(),
        grbs: Default::default(),
        crtbs: Default::default(),
        prtbs: Default::default(),
        directory: BTreeMap::new(),
        hidden: BTreeSet::new(),
        rng: Rng::new(options.seed),
    };
    small(&mut st);
    if options.size == DatasetSize::Large {
        large(&mut st, options.seed);
    }
    disconnect_share(&mut st, options.disconnected_share, options.seed);
    if !options.key_owner_admin {
        st.set_admin(ADMIN_USER_ID, false);
    }
    st
}

fn cluster(st: &mut State, id: &str, name: &str, provider: &str, l: &[(&str, &str)]) {
    st.clusters.insert(
        id.into(),
        Cluster {
            id: id.into(),
            name: name.into(),
            labels: labels(l),
            created: at(0),
            provider: provider.into(),
        },
    );
    st.namespaces.entry(id.into()).or_default();
}

fn project(st: &mut State, id: &str, name: &str, new_namespace: bool, l: &[(&str, &str)]) {
    let cluster_id = id.split_once(':').map_or(id, |(c, _)| c).to_string();
    st.projects.insert(
        id.into(),
        Project {
            id: id.into(),
            cluster_id,
            name: name.into(),
            description: String::new(),
            labels: labels(l),
            created: at(if new_namespace { 500_000 } else { 10 }),
            new_namespace,
        },
    );
}

fn namespace(st: &mut State, cluster_id: &str, name: &str, project: Option<&str>) {
    st.namespaces.entry(cluster_id.into()).or_default().insert(
        name.into(),
        Namespace {
            name: name.into(),
            cluster_id: cluster_id.into(),
            project_id: project.map(|p| format!("{cluster_id}:{p}")),
            labels: BTreeMap::new(),
            created: at(20),
        },
    );
}

fn global_role(st: &mut State, id: &str, name: &str, new_user_default: bool, rules: Vec<PolicyRule>) {
    st.global_roles.insert(
        id.into(),
        GlobalRole {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            builtin: true,
            new_user_default,
            created: at(0),
            rules,
        },
    );
}

fn role_template(st: &mut State, id: &str, name: &str, context: &str, builtin: bool, locked: bool, hidden: bool) {
    st.role_templates.insert(
        id.into(),
        RoleTemplate {
            id: id.into(),
            name: name.into(),
            context: context.into(),
            builtin,
            locked,
            hidden,
            description: String::new(),
            created: at(0),
        },
    );
}

fn user(st: &mut State, id: &str, username: Option<&str>, name: &str, principal: Option<&str>) {
    let principal = principal.map_or_else(|| format!("local://{id}"), str::to_string);
    st.users.insert(
        id.into(),
        User {
            id: id.into(),
            username: username.map(str::to_string),
            name: name.into(),
            description: String::new(),
            principal_ids: vec![principal],
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            enabled: true,
            must_change_password: false,
            password: username.map(|u| format!("{u}-sim-password-0001")),
            principals_at: None,
            created: at(30),
        },
    );
}

struct Seed<'a> {
    id: &'a str,
    scope: BindingScope,
    role: &'a str,
    resource: &'a str,
    user: Option<&'a str>,
    group: Option<&'a str>,
}

fn binding(st: &mut State, s: Seed) {
    // As the binding controller leaves it: only a principal ending with the user id
    // (`crtb_handler.go` reconcileSubject), so an external user's bindings have none.
    let user_principal_id = s
        .user
        .and_then(|u| st.users.get(u))
        .and_then(|u| u.principal_ids.iter().find(|p| p.ends_with(u.id.as_str())).cloned());
    let b = Binding {
        id: s.id.into(),
        name: s.id.split_once(':').map_or(s.id, |(_, n)| n).into(),
        scope: s.scope,
        role_id: s.role.into(),
        resource_id: s.resource.into(),
        user_id: s.user.map(str::to_string),
        user_principal_id,
        group_principal_id: s.group.map(str::to_string),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
        created: at(40),
        settles_at: None,
        remote_done: super::store::Binding::remote_pass(s.scope, s.scope == BindingScope::Global && s.role == "admin")
            .map(|_| true),
        reconcile_at: None,
        subject_error: false,
        removing: None,
    };
    let map = match s.scope {
        BindingScope::Global => &mut st.grbs,
        BindingScope::Cluster => &mut st.crtbs,
        BindingScope::Project => &mut st.prtbs,
    };
    map.insert(b.id.clone(), b);
}

fn directory(st: &mut State, id: &str, login: &str, name: &str, kind: &str) {
    st.directory.insert(
        id.into(),
        Principal {
            id: id.into(),
            name: name.into(),
            login_name: login.into(),
            principal_type: kind.into(),
        },
    );
}

/// The small dataset: fixed ids, documented in the module brief and relied on by tests.
fn small(st: &mut State) {
    cluster(st, "local", "local", "k3s", &[("provider.cattle.io", "k3s")]);
    cluster(
        st,
        "c-7x2k9",
        "prod-eu",
        "rke2",
        &[("env", "prod"), ("region", "eu-west-1")],
    );
    cluster(st, "c-m-4bq8z2lp", "staging", "rke2", &[("env", "staging")]);

    project(st, "local:p-8kq2w", "Default", false, &[]);
    project(
        st,
        "local:p-tz5mn",
        "System",
        false,
        &[("authz.management.cattle.io/system-project", "true")],
    );
    project(st, "c-7x2k9:p-abcde", "Default", false, &[]);
    project(st, "c-7x2k9:p-x4m7q", "payments", true, &[("team", "payments")]);
    project(st, "c-m-4bq8z2lp:p-h6v9r", "Default", false, &[]);
    project(
        st,
        "c-m-4bq8z2lp:p-w3j5n",
        "System",
        false,
        &[("authz.management.cattle.io/system-project", "true")],
    );

    namespace(st, "local", "default", Some("p-8kq2w"));
    namespace(st, "local", "kube-system", Some("p-tz5mn"));
    namespace(st, "local", "cattle-system", Some("p-tz5mn"));
    namespace(st, "local", "kube-public", None);
    namespace(st, "c-7x2k9", "default", Some("p-abcde"));
    namespace(st, "c-7x2k9", "kube-system", None);
    namespace(st, "c-7x2k9", "payments-api", Some("p-x4m7q"));
    namespace(st, "c-7x2k9", "payments-db", Some("p-x4m7q"));
    namespace(st, "c-7x2k9", "ingress-nginx", None);
    namespace(st, "c-m-4bq8z2lp", "default", Some("p-h6v9r"));
    namespace(st, "c-m-4bq8z2lp", "kube-system", Some("p-w3j5n"));
    namespace(st, "c-m-4bq8z2lp", "staging-web", Some("p-h6v9r"));
    namespace(st, "c-m-4bq8z2lp", "monitoring", None);

    // A few rules of each (rancher `pkg/data/management/role_data.go`), enough for an access
    // review; `admin` has its real two.
    let on = PolicyRule::on;
    let management = ["management.cattle.io"];
    let read = ["get", "list", "watch"];
    let roles = [
        ("admin", "Admin", false, PolicyRule::admin()),
        (
            "restricted-admin",
            "Restricted Admin",
            false,
            vec![
                on(&[""], &["secrets"], &["create"]),
                on(&["catalog.cattle.io"], &["clusterrepos"], &["*"]),
            ],
        ),
        (
            "user",
            "Standard User",
            true,
            vec![
                on(&management, &["clusters"], &["create"]),
                on(&management, &["preferences"], &["*"]),
            ],
        ),
        (
            "user-base",
            "User-Base",
            false,
            vec![
                on(&management, &["preferences"], &["*"]),
                on(&management, &["settings"], &read),
            ],
        ),
        (
            "authn-manage",
            "Configure Authentication",
            false,
            vec![on(&management, &["authconfigs"], &["get", "list", "watch", "update"])],
        ),
        (
            "clusters-create",
            "Create new Clusters",
            false,
            vec![on(&management, &["clusters"], &["create"])],
        ),
    ];
    for (id, name, new_user_default, rules) in roles {
        global_role(st, id, name, new_user_default, rules);
    }

    role_template(st, "cluster-owner", "Cluster Owner", "cluster", true, false, false);
    role_template(st, "cluster-member", "Cluster Member", "cluster", true, false, false);
    role_template(st, "nodes-view", "View Nodes", "cluster", true, false, false);
    role_template(st, "project-owner", "Project Owner", "project", true, false, false);
    role_template(st, "project-member", "Project Member", "project", true, false, false);
    role_template(st, "read-only", "Read-only", "project", true, false, false);
    role_template(st, "create-ns", "Create Namespaces", "project", true, false, true);
    role_template(st, "rt-lock1", "Legacy Deployer", "cluster", false, true, false);

    user(st, ADMIN_USER_ID, Some("admin"), "Default Admin", None);
    user(st, "u-alice1", Some("alice"), "Alice Example", None);
    user(st, "u-bob01", Some("bob"), "Bob Example", None);
    let octo = external_user_id("github_user://4242");
    user(st, &octo, None, "Octo Cat", Some("github_user://4242"));

    directory(st, "github_user://4242", "octocat", "Octo Cat", "user");
    directory(st, "github_user://5151", "hubot", "Hubot Robot", "user");
    directory(st, "github_user://6060", "mona", "Mona Lisa", "user");
    directory(st, "github_team://777", "platform-team", "Platform Team", "group");
    directory(st, "github_team://888", "sre", "Site Reliability", "group");

    use BindingScope::{Cluster as C, Global as G, Project as P};
    let seeds = [
        Seed {
            id: "grb-admin",
            scope: G,
            role: "admin",
            resource: "global",
            user: Some(ADMIN_USER_ID),
            group: None,
        },
        Seed {
            id: "grb-al1ce",
            scope: G,
            role: "user",
            resource: "global",
            user: Some("u-alice1"),
            group: None,
        },
        Seed {
            id: "grb-b0b01",
            scope: G,
            role: "user",
            resource: "global",
            user: Some("u-bob01"),
            group: None,
        },
        Seed {
            id: "local:crtb-al1ce",
            scope: C,
            role: "cluster-owner",
            resource: "local",
            user: Some("u-alice1"),
            group: None,
        },
        Seed {
            id: "c-7x2k9:crtb-grp01",
            scope: C,
            role: "cluster-member",
            resource: "c-7x2k9",
            user: None,
            group: Some("github_team://777"),
        },
        Seed {
            id: "p-abcde:prtb-b0b01",
            scope: P,
            role: "project-member",
            resource: "c-7x2k9:p-abcde",
            user: Some("u-bob01"),
            group: None,
        },
    ];
    for s in seeds {
        binding(st, s);
    }
}

const TARGET_CLUSTERS: usize = 200;
const TARGET_PROJECTS: usize = 2_000;
const TARGET_NAMESPACES: usize = 20_000;
const TARGET_USERS: usize = 10_000;
const TARGET_BINDINGS: usize = 50_000;

/// The small dataset plus generated objects up to the targets above.
fn large(st: &mut State, seed: u64) {
    let mut rng = Rng::new(seed ^ 0x1a2b_3c4d);
    let envs = ["prod", "staging", "dev", "qa"];
    let regions = ["eu-west-1", "us-east-1", "ap-south-1"];

    // Clusters: alternate imported (c-xxxxx) and provisioned (c-m-xxxxxxxx) ids.
    let mut cluster_ids: Vec<String> = st.clusters.keys().cloned().collect();
    let mut i = 0;
    while st.clusters.len() < TARGET_CLUSTERS {
        i += 1;
        let id = if i % 2 == 0 {
            format!("c-{}", rng.name_chars(5))
        } else {
            format!("c-m-{}", rng.name_chars(8))
        };
        if st.clusters.contains_key(&id) {
            continue;
        }
        let env = envs[i % envs.len()];
        cluster(
            st,
            &id,
            &format!("{env}-{i:03}"),
            "rke2",
            &[("env", env), ("region", regions[i % regions.len()])],
        );
        cluster_ids.push(id);
    }

    // Projects: round-robin over the generated clusters; a third created on 2.12+.
    let generated: Vec<String> = cluster_ids[3..].to_vec();
    let mut project_ids: Vec<String> = st.projects.keys().cloned().collect();
    let mut n = 0usize;
    while st.projects.len() < TARGET_PROJECTS {
        let c = &generated[n % generated.len()];
        n += 1;
        let id = format!("{c}:p-{}", rng.name_chars(5));
        if st.projects.contains_key(&id) {
            continue;
        }
        let name = match n / generated.len() {
            0 => "Default".to_string(),
            1 => "System".to_string(),
            k => format!("team-{k:02}"),
        };
        project(
            st,
            &id,
            &name,
            n.is_multiple_of(3),
            &[("team", &format!("t{}", n % 50))],
        );
        project_ids.push(id);
    }

    // Namespaces: round-robin over projects; one in ten in no project.
    let mut count: usize = st.namespaces.values().map(BTreeMap::len).sum();
    let mut k = 0usize;
    while count < TARGET_NAMESPACES {
        let p = &project_ids[k % project_ids.len()];
        k += 1;
        let Some((c, short)) = p.split_once(':') else { continue };
        let name = format!("ns-{k:05}");
        let project = if k.is_multiple_of(10) { None } else { Some(short) };
        let (c, short) = (c.to_string(), project.map(str::to_string));
        namespace(st, &c, &name, short.as_deref());
        count += 1;
    }

    // Users: local users, and every fifth an external (GitHub) one.
    let mut user_ids: Vec<String> = st
        .users
        .keys()
        .filter(|u| u.as_str() != ADMIN_USER_ID)
        .cloned()
        .collect();
    let mut j = 0usize;
    while st.users.len() < TARGET_USERS {
        j += 1;
        if j.is_multiple_of(5) {
            let principal = format!("github_user://{}", 100_000 + j);
            let id = external_user_id(&principal);
            if st.users.contains_key(&id) {
                continue;
            }
            user(st, &id, None, &format!("GitHub User {j}"), Some(&principal));
            user_ids.push(id);
        } else {
            let id = format!("u-{}", rng.name_chars(5));
            if st.users.contains_key(&id) {
                continue;
            }
            user(st, &id, Some(&format!("user{j:05}")), &format!("User {j:05}"), None);
            user_ids.push(id);
        }
    }
    for g in 0..40 {
        directory(
            st,
            &format!("github_team://{}", 9_000 + g),
            &format!("team-{g}"),
            &format!("Team {g}"),
            "group",
        );
    }

    // Bindings: a `user` GRB per user, then CRTBs and PRTBs at random, no duplicates.
    let mut seen: HashSet<(String, String, String)> = HashSet::new();
    let with_grb: HashSet<String> = st.grbs.values().filter_map(|b| b.user_id.clone()).collect();
    for u in &user_ids {
        if with_grb.contains(u) {
            continue;
        }
        let id = super::store::unique_name(&mut rng, "grb-", |n| st.grbs.contains_key(n));
        binding(
            st,
            Seed {
                id: &id,
                scope: BindingScope::Global,
                role: "user",
                resource: "global",
                user: Some(u),
                group: None,
            },
        );
    }
    let cluster_roles = ["cluster-owner", "cluster-member", "nodes-view"];
    let project_roles = ["project-owner", "project-member", "read-only"];
    let total = |st: &State| st.grbs.len() + st.crtbs.len() + st.prtbs.len();
    let crtb_target = (TARGET_BINDINGS - total(st)) * 2 / 5;
    while st.crtbs.len() < crtb_target {
        let c = cluster_ids[rng.below(cluster_ids.len())].clone();
        let role = cluster_roles[rng.below(cluster_roles.len())];
        let (user, group) = subject(&mut rng, &user_ids);
        if !seen.insert((
            c.clone(),
            role.into(),
            user.clone().or(group.clone()).unwrap_or_default(),
        )) {
            continue;
        }
        let name = super::store::unique_name(&mut rng, "crtb-", |n| st.crtbs.contains_key(&format!("{c}:{n}")));
        let id = format!("{c}:{name}");
        binding(
            st,
            Seed {
                id: &id,
                scope: BindingScope::Cluster,
                role,
                resource: &c,
                user: user.as_deref(),
                group: group.as_deref(),
            },
        );
    }
    while total(st) < TARGET_BINDINGS {
        let p = project_ids[rng.below(project_ids.len())].clone();
        let role = project_roles[rng.below(project_roles.len())];
        let (user, group) = subject(&mut rng, &user_ids);
        if !seen.insert((
            p.clone(),
            role.into(),
            user.clone().or(group.clone()).unwrap_or_default(),
        )) {
            continue;
        }
        let Some(ns) = st.projects.get(&p).map(|pr| pr.prtb_namespace(st.version)) else {
            continue;
        };
        let name = super::store::unique_name(&mut rng, "prtb-", |n| st.prtbs.contains_key(&format!("{ns}:{n}")));
        let id = format!("{ns}:{name}");
        binding(
            st,
            Seed {
                id: &id,
                scope: BindingScope::Project,
                role,
                resource: &p,
                user: user.as_deref(),
                group: group.as_deref(),
            },
        );
    }
}

/// A user (nine times in ten) or a group principal.
fn subject(rng: &mut Rng, users: &[String]) -> (Option<String>, Option<String>) {
    if rng.below(10) == 0 {
        (None, Some(format!("github_team://{}", 9_000 + rng.below(40))))
    } else {
        (Some(users[rng.below(users.len())].clone()), None)
    }
}

/// Marks `share` (0.0-1.0) of the clusters other than `local` (Rancher's own, never behind an
/// agent tunnel) as disconnected, picked by the seed: the same clusters for the same seed.
fn disconnect_share(st: &mut State, share: f64, seed: u64) {
    if share <= 0.0 {
        return;
    }
    let mut ids: Vec<(u64, &String)> = st
        .clusters
        .keys()
        .filter(|id| id.as_str() != "local")
        .enumerate()
        .map(|(i, id)| (super::store::mix(seed ^ 0xd15c_0bad ^ i as u64), id))
        .collect();
    ids.sort();
    let n = ((share.min(1.0) * ids.len() as f64).round() as usize).min(ids.len());
    let chosen: Vec<String> = ids.iter().take(n).map(|(_, id)| (*id).clone()).collect();
    st.disconnected.extend(chosen);
}
