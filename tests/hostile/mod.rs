//! Strategies for hostile input, shared by the property suite and the hostile control plane:
//! wrong types, missing fields, huge numbers and strings, bounded deep nesting, odd ids.

#![allow(dead_code)] // each test binary uses its own subset

use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Strings an attacker or a broken peer sends where an id or a name belongs.
pub const ODD_STRINGS: &[&str] = &[
    "",
    " ",
    "\t\n",
    ".",
    "..",
    "../",
    "../../users",
    "c-x/../../users",
    "c-x?userId=y",
    "c-x#frag",
    "local%2F..",
    "%2e%2e",
    "%00",
    "a\0b",
    "\u{202e}gnp.exe",
    "ünïcødé ☃ 𝔘",
    "c-x:p-y",
    "c-x:",
    ":p-y",
    "::",
    "global",
    "local",
    "u-abc12",
    "github_user://123",
    "okta_group://admins",
    "null",
    "true",
    "0",
    "-1",
    "18446744073709551616",
    "2030-01-01T00:00:00Z",
    "9999999-12-31T23:59:59Z",
    "validate",
    "grant",
    "revoke",
    "sweep",
    "rancher",
    "APONO",
    "cluster-owner",
    "{\"a\":1}",
    "' OR 1=1 --",
    "<script>alert(1)</script>",
    "${HOME}",
    "http://169.254.169.254/latest/meta-data/",
];

/// An odd string: a known-bad one, arbitrary unicode (controls included), or a huge one.
pub fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(ODD_STRINGS).prop_map(str::to_string),
        3 => "\\PC{0,24}",
        2 => prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        1 => (1usize..=4, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n * 50_000)),
    ]
}

/// Numbers at and past every limit a parser may hold them in.
pub fn hostile_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(vec![
            json!(0),
            json!(-1),
            json!(u32::MAX),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(1e308),
            json!(-1e308),
            json!(0.5),
            json!(4294967296u64),
        ]),
    ]
}

/// Keys that mean something to some parser, and some that do not.
const KEYS: &[&str] = &[
    "id",
    "kind",
    "type",
    "name",
    "attempt",
    "lease_token",
    "lease_expires_at",
    "integration",
    "params",
    "config",
    "secret_store",
    "credentials",
    "access_key",
    "secret_key",
    "host",
    "user",
    "group",
    "role",
    "resource",
    "ttl_seconds",
    "grant_id",
    "user_id",
    "binding_ids",
    "all",
    "expires_at",
    "data",
    "pagination",
    "next",
    "status",
    "code",
    "message",
    "__proto__",
    "",
];

/// Any JSON value, nested at most 6 deep.
pub fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        hostile_number(),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![3 => prop::sample::select(KEYS).prop_map(str::to_string), 1 => hostile_string()],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Nesting far deeper than any real answer (bounded: serde's recursion limit is 128).
pub fn deeply_nested() -> impl Strategy<Value = Value> {
    (1usize..200, any::<bool>()).prop_map(|(depth, arrays)| {
        let mut v = json!("bottom");
        for _ in 0..depth {
            v = if arrays { json!([v]) } else { json!({ "params": v }) };
        }
        v
    })
}

/// One change to a value: a field dropped, replaced by anything, or the whole value swapped.
#[derive(Debug, Clone)]
enum Mutation {
    Remove(Vec<String>),
    Replace(Vec<String>, Value),
}

/// Every path to a field of `v` (objects only; arrays are replaced whole).
fn paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Value::Object(map) = v {
        for (k, child) in map {
            prefix.push(k.clone());
            out.push(prefix.clone());
            paths(child, prefix, out);
            prefix.pop();
        }
    }
}

fn apply(v: &mut Value, m: &Mutation) {
    let (path, replacement) = match m {
        Mutation::Remove(p) => (p, None),
        Mutation::Replace(p, r) => (p, Some(r)),
    };
    let Some((last, parents)) = path.split_last() else {
        if let Some(r) = replacement {
            *v = r.clone();
        }
        return;
    };
    let mut node = v;
    for key in parents {
        match node.get_mut(key) {
            Some(child) => node = child,
            None => return,
        }
    }
    if let Value::Object(map) = node {
        match replacement {
            Some(r) => {
                map.insert(last.clone(), r.clone());
            }
            None => {
                map.remove(last);
            }
        }
    }
}

/// `base`, valid, with 0 to 4 mutations: fields dropped or replaced by hostile values (wrong
/// types, odd strings, huge numbers, deep nesting). Zero mutations keep the valid case covered.
pub fn mutated(base: Value) -> impl Strategy<Value = Value> {
    let mut all = Vec::new();
    paths(&base, &mut Vec::new(), &mut all);
    all.push(Vec::new()); // the whole value
    let replacement = prop_oneof![6 => arbitrary_json(), 1 => deeply_nested()];
    let mutation = (prop::sample::select(all), any::<bool>(), replacement).prop_map(|(path, remove, r)| {
        if remove {
            Mutation::Remove(path)
        } else {
            Mutation::Replace(path, r)
        }
    });
    prop::collection::vec(mutation, 0..=4).prop_map(move |mutations| {
        let mut v = base.clone();
        for m in &mutations {
            apply(&mut v, m);
        }
        v
    })
}

/// A valid Rancher integration pointing at `host` (inline credentials, plain HTTP allowed).
pub fn valid_integration(host: &str) -> Value {
    json!({
        "type": "rancher",
        "name": "hostile",
        "config": {"host": host, "insecure_http": true, "timeout_seconds": 2, "connect_timeout_seconds": 1},
        "secret_store": {"type": "APONO", "credentials": {"access_key": "token-abcde", "secret_key": "not-a-real-secret-value-0123456789"}}
    })
}

/// A valid leased grant job for `integration` at `host`.
pub fn valid_grant_job(id: &str, lease_token: &str, host: &str) -> Value {
    json!({
        "id": id,
        "kind": "grant",
        "attempt": 1,
        "lease_token": lease_token,
        "lease_expires_at": "2099-01-01T00:00:00Z",
        "integration": valid_integration(host),
        "params": {
            "grant_id": "g-1",
            "user": "alice",
            "role": "cluster-member",
            "resource": "c-x",
            "expires_at": "2099-01-01T00:00:00Z"
        }
    })
}
