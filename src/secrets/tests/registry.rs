//! The registry and the shared behaviour: references, values, cache, singleflight, invalidation,
//! metrics, configuration. No server needed.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::support::{reference, value_of};
use crate::config::SecretsConfig;
use crate::secrets::{MemoryStore, SecretError, SecretRef, SecretStores, value};

#[test]
fn inline_ref_parses_and_debug_hides_values() {
    let r = reference(json!({
        "type": "APONO", "credentials": {"access_key": "token-abc", "secret_key": "canary-secret-9"}
    }));
    assert_eq!(r.store_type(), "APONO");
    let dbg = format!("{r:?}");
    assert!(!dbg.contains("canary-secret-9"), "{dbg}");
    assert!(dbg.contains("secret_key"));
    // The control plane must be able to hand the credentials to the agent.
    assert!(serde_json::to_string(&r).unwrap().contains("canary-secret-9"));
}

#[test]
fn refs_parse_with_apono_field_names_and_optional_fields() {
    for (v, t) in [
        (json!({"type": "AWS", "region": "eu-west-1", "secret_id": "k"}), "AWS"),
        (
            json!({"type": "AWS", "region": "eu-west-1", "secret_id": "k", "role_arn": "arn:aws:iam::1:role/r"}),
            "AWS",
        ),
        (
            json!({"type": "KUBERNETES", "namespace": "ns", "name": "k"}),
            "KUBERNETES",
        ),
        (json!({"type": "AZURE", "vault_url": "https://v", "name": "k"}), "AZURE"),
        (json!({"type": "GCP", "project": "p", "secret_id": "k"}), "GCP"),
        (
            json!({"type": "GCP", "project": "p", "secret_id": "k", "version": "3"}),
            "GCP",
        ),
        (
            json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "k"}),
            "HASHICORP_VAULT",
        ),
        (
            json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "k", "vault": "prod"}),
            "HASHICORP_VAULT",
        ),
    ] {
        let r = reference(v.clone());
        assert_eq!(r.store_type(), t);
        // Round trip: what the control plane stores is what the agent reads.
        assert_eq!(serde_json::to_value(&r).unwrap(), v);
    }
}

#[test]
fn bad_refs_are_clear_errors() {
    let e = serde_json::from_value::<SecretRef>(json!({"type": "ONEPASSWORD", "vault": "x"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ONEPASSWORD") && e.contains("HASHICORP_VAULT"), "{e}");
    let e = serde_json::from_value::<SecretRef>(json!({"type": "AWS", "region": "eu-west-1"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("secret_id"), "{e}");
    let e = serde_json::from_value::<SecretRef>(json!({"region": "eu-west-1"}))
        .unwrap_err()
        .to_string();
    assert!(e.contains("type"), "{e}");
    // A misspelt optional field is named, not silently ignored.
    let e =
        serde_json::from_value::<SecretRef>(json!({"type": "GCP", "project": "p", "secret_id": "s", "versoin": "3"}))
            .unwrap_err()
            .to_string();
    assert!(e.contains("unknown field `versoin`"), "{e}");
    let e = serde_json::from_value::<SecretRef>(
        json!({"type": "AWS", "region": "r", "secret_id": "s", "roleArn": "arn:aws:iam::1:role/x"}),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("unknown field `roleArn`") && e.contains("role_arn"), "{e}");
}

#[tokio::test]
async fn unsupported_store_is_a_clear_error() {
    let r = reference(json!({"type": "GCP", "project": "p", "secret_id": "k"}));
    let e = SecretStores::empty().fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_unsupported");
    assert!(e.to_string().contains("GCP"));
}

#[cfg(not(feature = "store-gcp"))]
#[tokio::test]
async fn a_build_without_a_store_answers_unsupported() {
    let r = reference(json!({"type": "GCP", "project": "p", "secret_id": "k"}));
    let e = SecretStores::default().fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_unsupported");
}

#[test]
fn default_registry_lists_the_features_stores() {
    let types = SecretStores::default().types();
    assert!(types.contains(&"APONO".to_string()));
    assert_eq!(types.contains(&"AWS".to_string()), cfg!(feature = "store-aws"));
    assert_eq!(types.contains(&"AZURE".to_string()), cfg!(feature = "store-azure"));
    assert_eq!(types.contains(&"GCP".to_string()), cfg!(feature = "store-gcp"));
    assert_eq!(
        types.contains(&"KUBERNETES".to_string()),
        cfg!(feature = "store-kubernetes")
    );
    assert_eq!(
        types.contains(&"HASHICORP_VAULT".to_string()),
        cfg!(feature = "store-vault")
    );
}

#[test]
fn values_become_string_maps() {
    let r = reference(json!({"type": "AWS", "region": "r", "secret_id": "s"}));
    let s = value::from_text(
        &r,
        r#"{"access_key":"a","secret_key":"b","port":443,"tls":true}"#.into(),
    )
    .unwrap();
    assert_eq!(value_of(&s, "access_key"), "a");
    assert_eq!(value_of(&s, "port"), "443");
    assert_eq!(value_of(&s, "tls"), "true");
    let s = value::from_text(&r, "token-xyz:abc".into()).unwrap();
    assert_eq!(value_of(&s, "value"), "token-xyz:abc");
    // Other plain text is only `value`.
    let s = value::from_text(&r, "my super secret data".into()).unwrap();
    assert_eq!(s.keys().collect::<Vec<_>>(), vec!["value"]);
    // A JSON string or list is not an object: kept whole as the plain value.
    let s = value::from_text(&r, "[1,2]".into()).unwrap();
    assert_eq!(value_of(&s, "value"), "[1,2]");

    let e = value::from_text(&r, r#"{"outer":{"inner":"canary-nested-1"}}"#.into()).unwrap_err();
    assert_eq!(e.code(), "secret_malformed");
    assert!(
        e.to_string().contains("\"outer\"") && !e.to_string().contains("canary"),
        "{e}"
    );
    let e = value::from_text(&r, r#"{"k":"canary-broken-2""#.into()).unwrap_err();
    assert!(!e.to_string().contains("canary"), "{e}");
    let e = value::from_bytes(&r, vec![0xff, 0xfe, 0x00]).unwrap_err();
    assert!(e.to_string().contains("binary"), "{e}");
    let e = value::from_bytes_map(&r, [("cert".to_string(), vec![0xff, 0x00])]).unwrap_err();
    assert!(e.to_string().contains("\"cert\""), "{e}");
    let e = value::from_text(&r, r#"{"k":null}"#.into()).unwrap_err();
    assert!(e.to_string().contains("\"k\""), "{e}");
}

#[test]
fn a_plain_text_access_key_pair_is_a_rancher_key() {
    use crate::integrations::rancher::ApiKey;
    let r = reference(json!({"type": "AWS", "region": "r", "secret_id": "s"}));
    // As `aws secretsmanager create-secret --secret-string 'token-abc:xyz'` (or `echo ... |` with
    // its newline) stores it.
    for text in ["token-abc:xyz", "token-abc:xyz\n"] {
        let s = value::from_text(&r, text.into()).unwrap();
        assert!(ApiKey::from_secret(&s).is_ok(), "{text:?}");
    }
    // Text that is not one pair still names the keys Rancher needs.
    let s = value::from_text(&r, "just-a-password".into()).unwrap();
    let e = ApiKey::from_secret(&s).unwrap_err().to_string();
    assert!(e.contains("access_key") && e.contains("keys: value"), "{e}");
    let s = value::from_text(&r, "a:b:c".into()).unwrap();
    assert!(ApiKey::from_secret(&s).is_err());
}

fn aws_ref() -> SecretRef {
    reference(json!({"type": "AWS", "region": "eu-west-1", "secret_id": "rancher"}))
}

#[tokio::test]
async fn cache_reuses_then_invalidate_rereads_a_rotated_value() {
    let mem = Arc::new(MemoryStore::new("AWS"));
    let r = aws_ref();
    mem.set(&r, [("token", "old")]);
    let stores = SecretStores::empty().with_store(mem.clone());
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "old");
    mem.set(&r, [("token", "new")]);
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "old", "cached");
    assert_eq!(mem.calls(), 1);
    // A clone shares the cache: the executor's copy and the CLI's see the same thing.
    stores.clone().invalidate(&r);
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "new");
    assert_eq!(mem.calls(), 2);
    let m = stores.metrics();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].store.as_str(), m[0].calls, m[0].cache_hits), ("AWS", 2, 1));
}

/// Secrets review N20: after a rotation every job holding the old copy gets a 401 and drops it.
/// Only the copy it used goes: the first job's re-read is kept for the others, so one rotation
/// costs one store read, not one per job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_refusals_after_a_rotation_reads_the_store_once() {
    let mem = Arc::new(MemoryStore::new("AWS"));
    mem.set_delay(Duration::from_millis(20));
    let r = aws_ref();
    mem.set(&r, [("token", "old")]);
    let stores = SecretStores::empty().with_store(mem.clone());
    let used = stores.fetch(&r).await.unwrap();
    assert_ne!(used.read_id(), 0, "a cached copy names its read");
    mem.set(&r, [("token", "new")]);
    // Eight jobs refused with the old copy, one after another and then all at once.
    for _ in 0..3 {
        stores.invalidate_read(&r, used.read_id());
        assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "new");
    }
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (stores, r, read) = (stores.clone(), r.clone(), used.read_id());
            tokio::spawn(async move {
                stores.invalidate_read(&r, read);
                stores.fetch(&r).await.map(|s| value_of(&s, "token"))
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "new");
    }
    assert_eq!(mem.calls(), 2, "the first read and one re-read after the rotation");
    // A refusal of the new copy drops it (a second rotation).
    let current = stores.fetch(&r).await.unwrap();
    mem.set(&r, [("token", "newer")]);
    stores.invalidate_read(&r, current.read_id());
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "newer");
    assert_eq!(mem.calls(), 3);
}

#[tokio::test]
async fn ttl_zero_disables_the_cache_and_errors_are_not_cached() {
    let mem = Arc::new(MemoryStore::new("AWS"));
    let r = aws_ref();
    let stores = SecretStores::empty()
        .with_store(mem.clone())
        .with_cache_ttl(Duration::ZERO);
    let e = stores.fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found");
    mem.set(&r, [("token", "t")]);
    stores.fetch(&r).await.unwrap();
    stores.fetch(&r).await.unwrap();
    assert_eq!(mem.calls(), 3);
    let m = &stores.metrics()[0];
    assert_eq!(m.errors.get("secret_not_found"), Some(&1));
    assert_eq!(m.latency_buckets.len(), crate::secrets::metrics::LATENCY_BUCKETS.len());
}

#[tokio::test]
async fn ttl_expiry_rereads() {
    let mem = Arc::new(MemoryStore::new("AWS"));
    let r = aws_ref();
    mem.set(&r, [("token", "t")]);
    let stores = SecretStores::empty()
        .with_store(mem.clone())
        .with_cache_ttl(Duration::from_millis(50));
    stores.fetch(&r).await.unwrap();
    stores.fetch(&r).await.unwrap();
    assert_eq!(mem.calls(), 1);
    tokio::time::sleep(Duration::from_millis(80)).await;
    stores.fetch(&r).await.unwrap();
    assert_eq!(mem.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_reference_make_one_call() {
    for ttl in [Duration::from_secs(60), Duration::ZERO] {
        let mem = Arc::new(MemoryStore::new("AWS"));
        mem.set_delay(Duration::from_millis(100));
        let r = aws_ref();
        mem.set(&r, [("token", "t")]);
        let stores = SecretStores::empty().with_store(mem.clone()).with_cache_ttl(ttl);
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (stores, r) = (stores.clone(), r.clone());
                tokio::spawn(async move { stores.fetch(&r).await.map(|s| value_of(&s, "token")) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "t");
        }
        assert_eq!(mem.calls(), 1, "ttl {ttl:?}");
        // Errors are shared with those that waited, too.
        let other = reference(json!({"type": "AWS", "region": "eu-west-1", "secret_id": "missing"}));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (stores, r) = (stores.clone(), other.clone());
                tokio::spawn(async move { stores.fetch(&r).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap_err().code(), "secret_not_found");
        }
        assert_eq!(mem.calls(), 2, "ttl {ttl:?}");
    }
}

#[tokio::test]
async fn inline_credentials_are_never_cached() {
    let r = reference(json!({"type": "APONO", "credentials": {"token": "a:b"}}));
    let stores = SecretStores::empty().with_store(Arc::new(crate::secrets::AponoStore));
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "token"), "a:b");
    let empty = reference(json!({"type": "APONO", "credentials": {}}));
    assert_eq!(stores.fetch(&empty).await.unwrap_err().code(), "secret_malformed");
}

#[tokio::test]
async fn describe_all_reports_keys_or_errors() {
    let mem = Arc::new(MemoryStore::new("AWS"));
    let r = aws_ref();
    mem.set(&r, [("access_key", "a"), ("secret_key", "b")]);
    let missing = reference(json!({"type": "AWS", "region": "eu-west-1", "secret_id": "nope"}));
    let gcp = reference(json!({"type": "GCP", "project": "p", "secret_id": "k"}));
    let stores = SecretStores::empty().with_store(mem);
    let rows = stores.describe_all(&[r, missing, gcp]).await;
    assert_eq!(rows[0].0, "AWS eu-west-1/rancher");
    assert_eq!(
        rows[0].1.as_ref().unwrap(),
        &vec!["access_key".to_string(), "secret_key".to_string()]
    );
    assert!(matches!(rows[1].1, Err(SecretError::NotFound { .. })));
    assert!(matches!(rows[2].1, Err(SecretError::Unsupported { .. })));
}

#[test]
fn secrets_config_from_env_and_ttl_variable() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    let c = SecretsConfig::from_env(env(&[])).unwrap();
    assert_eq!(c.cache_ttl_seconds, 300);
    let c = SecretsConfig::from_env(env(&[
        ("APONO_SECRET_CACHE_TTL_SECONDS", "0"),
        ("ALLOWED_SECRETS_TO_READ", "a, b"),
    ]))
    .unwrap();
    assert_eq!(c.cache_ttl_seconds, 0);
    assert_eq!(c.allowed_secrets_to_read, vec!["a", "b"]);
    // Helm's brace form, copied into a plain variable (Docker users), means the same list.
    let c = SecretsConfig::from_env(env(&[("ALLOWED_SECRETS_TO_READ", "{secret1,secret2, secret3}")])).unwrap();
    assert_eq!(c.allowed_secrets_to_read, vec!["secret1", "secret2", "secret3"]);
    let e = SecretsConfig::from_env(env(&[("APONO_SECRET_CACHE_TTL_SECONDS", "5m")])).unwrap_err();
    assert!(e.to_string().contains("APONO_SECRET_CACHE_TTL_SECONDS"), "{e}");
    // Through the full loader too.
    let c = crate::config::Config::load_from(None, env(&[("APONO_SECRET_CACHE_TTL_SECONDS", "7")])).unwrap();
    assert_eq!(c.secrets.cache_ttl_seconds, 7);
    SecretStores::from_config(&c.secrets).unwrap();
}

#[test]
fn require_read_mark_is_opt_in_per_store() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    };
    let c = SecretsConfig::from_env(env(&[])).unwrap();
    assert!(!c.requires_read_mark("AZURE") && !c.requires_read_mark("GCP"));
    let c = SecretsConfig::from_env(env(&[("APONO_REQUIRE_READ_MARK", "azure")])).unwrap();
    assert!(c.requires_read_mark("AZURE") && !c.requires_read_mark("GCP"));
    assert!(c.problems().is_empty(), "{:?}", c.problems());
    let c = SecretsConfig::from_env(env(&[("APONO_REQUIRE_READ_MARK", "GCP,VAULT")])).unwrap();
    let problems = c.problems().join("; ");
    assert!(
        problems.contains("require_read_mark") && problems.contains("VAULT"),
        "{problems}"
    );
}

#[tokio::test]
async fn a_hung_store_times_out_as_unreachable() {
    let mem = Arc::new(MemoryStore::new("AWS"));
    mem.set_delay(Duration::from_secs(30));
    let r = aws_ref();
    mem.set(&r, [("token", "t")]);
    let stores = SecretStores::empty()
        .with_store(mem)
        .with_fetch_timeout(Duration::from_millis(50));
    let e = stores.fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_unreachable", "{e}");
    assert!(e.retryable());
}

/// Modules above `secrets`: it is composed by them and must not import them. Above all `config`:
/// it owns where settings come from, `secrets` owns what they mean (`SecretsSettings`).
const ABOVE_SECRETS: &[&str] = &[
    "config",
    "commands",
    "agent",
    "control_plane",
    "integrations",
    "demo",
    "sim",
];

/// The modules of `ABOVE_SECRETS` that `code` (Rust source) refers to through `crate::` or
/// `super::super::` (from `src/secrets/`), plain or in a `crate::{...}` group. Comments are
/// skipped; a path inside a string literal counts, which errs on the safe side.
fn modules_above_named_in(code: &str) -> Vec<&'static str> {
    let mut without_comments = String::with_capacity(code.len());
    let mut rest = code;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap_or_default();
            without_comments.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    let compact: String = without_comments.chars().filter(|c| !c.is_whitespace()).collect();
    // The items of every `crate::{...}` group, top level only (`a::{b,c}` is item `a::{b,c}`).
    let mut grouped = Vec::new();
    for (start, _) in compact.match_indices("crate::{") {
        let (mut depth, mut item) = (0, String::new());
        for c in compact[start + "crate::{".len()..].chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    grouped.push(std::mem::take(&mut item));
                    continue;
                }
                _ => {}
            }
            item.push(c);
        }
        grouped.push(item);
    }
    ABOVE_SECRETS
        .iter()
        .copied()
        .filter(|m| {
            compact.contains(&format!("crate::{m}"))
                || compact.contains(&format!("super::super::{m}"))
                || grouped
                    .iter()
                    .any(|item| item == m || item.starts_with(&format!("{m}::")) || item.starts_with(&format!("{m}as")))
        })
        .collect()
}

#[test]
fn the_import_check_sees_every_form() {
    for code in [
        "use crate::config::{ConfigError, SecretsConfig};",
        "use crate :: config;",
        "use crate::{secrets::Secret, config::ConfigError};",
        "use crate::{config as c};",
        "fn f() -> crate::config::ConfigError { todo!() }",
        "use super::super::config::Config;",
    ] {
        assert_eq!(modules_above_named_in(code), ["config"], "{code}");
    }
    for code in [
        "// use crate::config;\nuse super::settings::SecretsSettings;",
        "/* crate::config */ use crate::telemetry::metrics;",
        "use crate::{telemetry, secrets::settings::configure};",
    ] {
        assert!(modules_above_named_in(code).is_empty(), "{code}");
    }
}

/// `config` composes `secrets`, never the reverse: no non-test file of `src/secrets/` names
/// `crate::config` or another module above the stores (the test modules may, to load a config).
#[test]
fn secrets_never_import_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/secrets");
    let mut checked = 0;
    let mut offences = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        checked += 1;
        let code = std::fs::read_to_string(&path).unwrap();
        for module in modules_above_named_in(&code) {
            offences.push(format!("{} uses crate::{module}", path.display()));
        }
    }
    assert!(checked >= 8, "only {checked} files found in {}", dir.display());
    assert!(
        offences.is_empty(),
        "secrets must depend on nothing above it (take the value as a parameter, or move the type \
         into secrets::settings):\n{}",
        offences.join("\n")
    );
}

/// What the one-shot commands build their stores with: every bad setting named at once.
#[cfg(feature = "store-vault")]
#[test]
fn from_config_names_every_bad_setting() {
    let settings = SecretsConfig {
        allowed_secrets_to_read: vec!["apono/rancher/x".into()],
        hashicorp_vault_config: Some(secrecy::SecretString::from(r#"[{"address": "https://v:8200"}]"#)),
        require_read_mark: vec!["VAULT".into()],
        ..SecretsConfig::default()
    };
    let e = SecretStores::from_config(&settings).unwrap_err().to_string();
    for named in [
        "\"apono/rancher/x\"",
        "HASHICORP_VAULT_CONFIG",
        "APONO_REQUIRE_READ_MARK",
    ] {
        assert!(e.contains(named), "{named} not named: {e}");
    }
}
