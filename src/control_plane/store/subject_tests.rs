//! Schema v4: accesses found by subject with an exact match on indexed columns, on both backends,
//! and a state written by a v3 build migrated so its live accesses are found as new ones are.

use super::*;
use crate::integrations::Resource;

fn resource() -> Resource {
    Resource::Cluster("c-1".into())
}

/// An access as a v3 build would have kept it (no subject columns).
fn row(
    id: &str,
    subject: Subject,
    state: AccessState,
    user_id: Option<&str>,
    bound: Option<(&str, &str)>,
) -> AccessRow {
    let t = DateTime::from_timestamp_millis(1_700_000_000_000).expect("a time");
    AccessRow {
        id: id.into(),
        integration: "test".into(),
        subject,
        role: "cluster-member".into(),
        resource: resource(),
        ttl_seconds: 3600,
        create_user: false,
        state,
        created_at: t,
        granted_at: Some(t),
        expires_at: Some(t),
        revoked_at: None,
        grant_job_id: format!("j-{id}"),
        revoke_job_id: None,
        user_id: user_id.map(str::to_string),
        binding_ids: vec![format!("c-1:crtb-{id}")],
        access_details: None,
        last_error: None,
        revoke_requested: false,
        integration_spec: None,
        pre_existing: false,
        bound_subject: bound.map(|(field, value)| BoundSubject {
            field: field.into(),
            value: value.into(),
        }),
        owner: None,
        note: None,
    }
}

/// alice by username (her grant recorded her user id), alice again by her local principal
/// (pending: no user id yet, the key comes from the principal), a name JSON escapes, an ended
/// access of alice, and bob.
fn accesses() -> Vec<AccessRow> {
    vec![
        row(
            "ar-alice",
            Subject::user("alice"),
            AccessState::Active,
            Some("u-alice"),
            Some(("userId", "u-alice")),
        ),
        row(
            "ar-alice-local",
            Subject::user("local://u-alice"),
            AccessState::Pending,
            None,
            None,
        ),
        row(
            "ar-quote",
            Subject::user("o\"brien\\x"),
            AccessState::Revoking,
            Some("u-obrien"),
            None,
        ),
        row(
            "ar-ended",
            Subject::user("alice"),
            AccessState::Revoked,
            Some("u-alice"),
            Some(("userId", "u-alice")),
        ),
        row("ar-bob", Subject::user("bob"), AccessState::Active, Some("u-bob"), None),
    ]
}

fn ids(rows: Vec<Result<AccessRow, StoreError>>) -> Vec<String> {
    rows.into_iter().map(|r| r.expect("decodes").id).collect()
}

/// What every test below checks on a state holding [`accesses`].
fn assert_found_by_subject(c: &dyn Db) {
    let all = accesses();
    let on = Some(("cluster-member", &resource()));
    // By subject key: the username whose user id was recorded and the local principal name one
    // user; the ended access is not live; the access asked about is never in its own answer.
    assert_eq!(ids(live_access_naming(c, on, &all[0]).unwrap()), ["ar-alice-local"]);
    assert_eq!(ids(live_access_naming(c, None, &all[1]).unwrap()), ["ar-alice"]);
    // A name JSON escapes is matched exactly (it used to fall back to every live access).
    let mut quote_again = all[2].clone();
    quote_again.id = "ar-quote-2".into();
    assert_eq!(ids(live_access_naming(c, None, &quote_again).unwrap()), ["ar-quote"]);
    assert!(live_access_naming(c, None, &all[2]).unwrap().is_empty());
    let mut bob_again = all[4].clone();
    bob_again.id = "ar-bob-2".into();
    assert_eq!(ids(live_access_naming(c, on, &bob_again).unwrap()), ["ar-bob"]);
    // Another (role, resource): none.
    let other = Resource::Cluster("c-2".into());
    assert!(
        live_access_naming(c, Some(("cluster-member", &other)), &all[0])
            .unwrap()
            .is_empty()
    );
    // Many at once (a chunk of a mass expiry, more than one statement's worth): every live
    // access naming one of them, by name or key, themselves included; nothing else.
    let mut many: Vec<AccessRow> = (0..NAMING_BATCH + 5)
        .map(|i| {
            row(
                &format!("ar-nobody{i}"),
                Subject::user(&format!("nobody{i}")),
                AccessState::Active,
                None,
                None,
            )
        })
        .collect();
    many.push(all[0].clone());
    let mut found = ids(live_access_naming_any(c, &many).unwrap());
    found.sort();
    found.dedup();
    assert_eq!(found, ["ar-alice", "ar-alice-local"]);
    assert_eq!(ids(live_access_naming_any(c, &all[2..3]).unwrap()), ["ar-quote"]);
    let mut found = ids(live_access_naming_any(c, &[all[4].clone(), quote_again]).unwrap());
    found.sort();
    assert_eq!(found, ["ar-bob", "ar-quote"]);
    // A key learnt later (the grant recorded the user id) is written with the row.
    let mut carol = row("ar-carol", Subject::user("carol"), AccessState::Pending, None, None);
    insert_access(c, &carol).unwrap();
    let carol_by_id = row(
        "ar-x",
        Subject::user("local://u-carol"),
        AccessState::Pending,
        None,
        None,
    );
    assert!(
        live_access_naming(c, None, &carol_by_id).unwrap().is_empty(),
        "key not known yet"
    );
    carol.user_id = Some("u-carol".into());
    carol.state = AccessState::Active;
    update_access(c, &carol).unwrap();
    assert_eq!(ids(live_access_naming(c, None, &carol_by_id).unwrap()), ["ar-carol"]);
}

/// A state written with [`insert_v3`], once opened by this build.
fn assert_migrated(c: &dyn Db) {
    let version = first_value(
        "schema_version",
        c.query("SELECT MAX(version) FROM schema_version", &[]).unwrap(),
    );
    assert_eq!(version.unwrap(), Some(SCHEMA_VERSION));
    assert_found_by_subject(c);
}

/// Writes `accesses()` as a v3 build did: the v3 columns only.
fn insert_v3(c: &dyn Db) {
    for a in accesses() {
        let placeholders: Vec<String> = (1..=ACCESS_COLUMNS.split(',').count())
            .map(|i| format!("?{i}"))
            .collect();
        c.exec(
            &format!(
                "INSERT INTO access_requests ({ACCESS_COLUMNS}) VALUES ({})",
                placeholders.join(", ")
            ),
            &access_values(&a).unwrap(),
        )
        .unwrap();
    }
}

#[test]
fn accesses_are_found_by_subject_string_or_key_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let c = store.lock().unwrap();
    for a in accesses() {
        insert_access(&*c, &a).unwrap();
    }
    assert_found_by_subject(&*c);
}

/// The lookup is an index search, not a scan of every live access on the role (a mass expiry on
/// one role would read them all for each one that ends).
#[test]
fn the_subject_lookup_uses_the_subject_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let c = store.lock().unwrap();
    let conn = c.sqlite().unwrap();
    let plan = |sql: &str| -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt.query_map([], |r| r.get::<_, String>(3)).unwrap();
        rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
    };
    let p = plan(
        "SELECT id FROM access_requests WHERE (subject_name = 'a' OR subject_key = 'k') \
         AND state IN ('pending', 'active', 'revoking') ORDER BY seq",
    );
    assert!(
        p.contains("access_subject_name") && p.contains("access_subject_key") && !p.contains("SCAN access_requests"),
        "{p}"
    );
}

#[test]
fn a_v3_sqlite_state_migrates_and_its_live_accesses_are_found_by_subject() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DB_FILE);
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(include_str!("testdata/schema_v3.sql")).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (3);",
        )
        .unwrap();
        insert_v3(&conn);
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store = Store::open(dir.path()).expect("a v3 file opens");
    assert_migrated(&*store.lock().unwrap());
}

#[cfg(feature = "store-postgres")]
#[test]
fn a_v3_postgres_state_migrates_and_its_live_accesses_are_found_by_subject() {
    if !testing::postgres_available() {
        return;
    }
    let server = testing::shared().unwrap();
    let target = postgres::PgTarget::parse(&server.database("t_subject_keys_v3")).unwrap();
    {
        // As a v3 build left it: the v3 step only.
        let pg = postgres::PgStore::open(target.clone()).unwrap();
        let guard = pg.lock().unwrap();
        let c: &dyn Db = guard.as_ref().unwrap();
        let (v3, step) = PG_MIGRATIONS[0];
        assert_eq!(v3, 3);
        c.batch(step).unwrap();
        c.batch("CREATE TABLE schema_version (version BIGINT NOT NULL); INSERT INTO schema_version VALUES (3)")
            .unwrap();
        insert_v3(c);
    }
    let store = Store::open_backend(&Backend::Postgres(Box::new(target))).expect("a v3 database opens");
    assert_migrated(&*store.lock().unwrap());
}
