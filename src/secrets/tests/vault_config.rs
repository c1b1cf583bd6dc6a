//! `HASHICORP_VAULT_CONFIG`: accepted shapes and clear errors for bad ones.

use base64::Engine;
use secrecy::SecretString;

use crate::config::{Config, SecretsConfig};
use crate::secrets::{SecretStores, VaultDefinitions};

fn err(text: &str) -> String {
    match VaultDefinitions::parse(text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

/// Apono's documentation, verbatim: the AWS line has a trailing comma (JSON does not allow it).
const SEED_FROM_SECRET_STORE: &str = r#"[{"address":"http://HASHICORP_VAULT_URL","token":"HASHICORP_VAULT_TOKEN"},
{"from_secret_store": "AWS", "region": "AWS_REGION", "secret_id": "AWS_SECRET_ID",},
{"from_secret_store": "GCP", "project": "GCP_PROJECT_ID", "secret_id": "GCP_SECRET_ID"},
{"from_secret_store": "AZURE", "AZURE_KEY_VAULT_URL": "vault_url", "name": "SECRET_NAME"},
{"from_secret_store": "KUBERNETES", "NAMESPACE": "namespace", "name": "SECRET_NAME"}
]"#;

#[test]
fn seed_list_with_trailing_comma_is_accepted_with_a_warning_naming_it() {
    let logs = super::support::LogCapture::default();
    let _guard = logs.install();
    VaultDefinitions::parse(SEED_FROM_SECRET_STORE).unwrap();
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("HASHICORP_VAULT_CONFIG") && text.contains("trailing comma (line 2)"),
        "{text}"
    );
    // A comma inside a string value is data, not a trailing comma.
    let logs = super::support::LogCapture::default();
    let _guard = logs.install();
    VaultDefinitions::parse(r#"[{"address":"http://v","token":"t,}","namespace":"a,]"}]"#).unwrap();
    assert!(!logs.text().contains("trailing comma"), "{}", logs.text());
    // Still not JSON: a missing comma is refused.
    let e = err(r#"[{"address":"http://v" "token":"t"}]"#);
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn line_wrapped_ca_cert_base64_is_accepted() {
    let (cert, _) = super::support::self_signed(&["vault.local"]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert);
    // As `base64 ca.pem` prints it: wrapped at 76 columns (and JSON-escaped newlines inside the string).
    let wrapped: Vec<String> = b64
        .as_bytes()
        .chunks(76)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert!(wrapped.len() > 1);
    VaultDefinitions::parse(&format!(
        r#"[{{"address":"https://v","token":"t","ca_cert_base64":"{}"}}]"#,
        wrapped.join("\\n")
    ))
    .unwrap();
    VaultDefinitions::parse(&format!(
        r#"[{{"address":"https://v","token":"t","ca_cert_base64":"{}"}}]"#,
        wrapped.join("\\r\\n")
    ))
    .unwrap();
}

#[test]
fn apono_documented_shapes_parse() {
    VaultDefinitions::parse(SEED_FROM_SECRET_STORE).unwrap();
    VaultDefinitions::parse(r#"[{"address":"http://v","token":"t","skip_verify":"true"}]"#).unwrap();
    VaultDefinitions::parse(r#"[{"address":"http://v","token":"t","skip_verify":false,"namespace":"admin"}]"#).unwrap();
    VaultDefinitions::parse(r#"[{"address":"http://v","auth":"approle","role_id":"r","secret_id":"s"}]"#).unwrap();
    VaultDefinitions::parse(r#"[{"address":"http://v","auth":"kubernetes","role":"apono"}]"#).unwrap();
    let (cert, _) = super::support::self_signed(&["vault.local"]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert);
    VaultDefinitions::parse(&format!(
        r#"[{{"address":"https://v","token":"t","ca_cert_base64":"{b64}"}}]"#
    ))
    .unwrap();
}

#[test]
fn malformed_definitions_name_the_variable_the_entry_and_the_field() {
    let e = err(r#"[{"address":"http://v","token":"canary-tok-1"},{"address":"http://w"}]"#);
    assert!(
        e.contains("HASHICORP_VAULT_CONFIG") && e.contains("entry 1") && e.contains("\"token\""),
        "{e}"
    );
    assert!(!e.contains("canary"), "{e}");
    let e = err(r#"[{"token":"canary-tok-2"}]"#);
    assert!(e.contains("entry 0") && e.contains("\"address\""), "{e}");
    let e = err(r#"[{"address":"not a url","token":"canary-tok-3"}]"#);
    assert!(e.contains("\"address\"") && !e.contains("canary"), "{e}");
    let e = err(r#"[{"address":"http://v","token":"t","skip_verify":"maybe"}]"#);
    assert!(e.contains("\"skip_verify\""), "{e}");
    let e = err(r#"[{"address":"http://v","token":"t","ca_cert_base64":"!!!"}]"#);
    assert!(e.contains("\"ca_cert_base64\""), "{e}");
    let e = err(r#"[{"address":"http://v","token":"t","adress":"x"}]"#);
    assert!(e.contains("unknown field \"adress\""), "{e}");
    let e = err(r#"[{"from_secret_store":"ONEPASSWORD","name":"x"}]"#);
    assert!(e.contains("ONEPASSWORD") && e.contains("from_secret_store"), "{e}");
    let e = err(r#"[{"from_secret_store":"AWS","region":"eu-west-1"}]"#);
    assert!(e.contains("\"secret_id\""), "{e}");
    let e = err(r#"[{"from_secret_store":"AZURE","name":"x"}]"#);
    assert!(e.contains("AZURE_KEY_VAULT_URL"), "{e}");
    let e = err(r#"[{"address":"http://v","auth":"approle","role_id":"r"}]"#);
    assert!(e.contains("\"secret_id\""), "{e}");
    // Not JSON, not a list: serde_json's message (which can quote the input) is not passed on.
    let e = err(r#"[{"address":"http://v","token":"canary-tok-4"#);
    assert!(e.contains("not valid JSON") && !e.contains("canary"), "{e}");
    let e = err(r#"{"address":"http://v","token":"canary-tok-5"}"#);
    assert!(e.contains("JSON list") && !e.contains("canary"), "{e}");
    // Several problems are reported at once.
    let e = err(r#"[{"address":"http://v"}, 3]"#);
    assert!(e.contains("entry 0") && e.contains("entry 1"), "{e}");
}

#[test]
fn startup_fails_on_a_bad_variable_or_file_but_default_does_not_panic() {
    let config = SecretsConfig {
        hashicorp_vault_config: Some(SecretString::from(r#"[{"address":"http://v"}]"#)),
        ..SecretsConfig::default()
    };
    let e = SecretStores::from_config(&config).unwrap_err().to_string();
    assert!(e.contains("HASHICORP_VAULT_CONFIG") && e.contains("entry 0"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.json");
    std::fs::write(
        &path,
        r#"[{"address":"http://v","token":"t","skip_verify":"sometimes"}]"#,
    )
    .unwrap();
    let config = SecretsConfig {
        hashicorp_vault_config_file_path: Some(path.clone()),
        ..SecretsConfig::default()
    };
    let e = SecretStores::from_config(&config).unwrap_err().to_string();
    assert!(
        e.contains("HASHICORP_VAULT_CONFIG_FILE_PATH") && e.contains("skip_verify"),
        "{e}"
    );
    let missing = SecretsConfig {
        hashicorp_vault_config_file_path: Some(dir.path().join("nope.json")),
        ..SecretsConfig::default()
    };
    let e = SecretStores::from_config(&missing).unwrap_err().to_string();
    assert!(e.contains("cannot read"), "{e}");

    // The full config loader accepts the variable; the registry validates it.
    let c = Config::load_from(None, |k| {
        (k == "HASHICORP_VAULT_CONFIG").then(|| r#"[{"address":"http://127.0.0.1:1","token":"t"}]"#.to_string())
    })
    .unwrap();
    SecretStores::from_config(&c.secrets).unwrap();
}

#[tokio::test]
async fn no_vault_configured_is_a_clear_error() {
    let stores = SecretStores::from_config(&SecretsConfig::default()).unwrap();
    let r =
        super::support::reference(serde_json::json!({"type":"HASHICORP_VAULT","secret_engine":"secret","path":"x"}));
    let e = stores.fetch(&r).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_misconfigured");
    assert!(e.to_string().contains("HASHICORP_VAULT_CONFIG"), "{e}");
}

#[test]
fn secrets_config_problems_are_pure_and_named() {
    let config = SecretsConfig {
        hashicorp_vault_config: Some(SecretString::from(
            r#"[{"address":"http://v","token":"canary-tok-6","skip_verify":"x"}]"#,
        )),
        allowed_secrets_to_read: vec!["apono/rancher/x".into()],
        ..SecretsConfig::default()
    };
    let problems = config.problems().join("; ");
    assert!(
        problems.contains("HASHICORP_VAULT_CONFIG: entry 0: field \"skip_verify\""),
        "{problems}"
    );
    assert!(problems.contains("ALLOWED_SECRETS_TO_READ"), "{problems}");
    assert!(!problems.contains("canary"), "{problems}");
    assert!(SecretsConfig::default().problems().is_empty());
}

/// Secrets review N23: text pasted from Notepad, an env file or a chat tool. A byte-order mark
/// is dropped; surrounding quotes and typographic quotes are named, with where they are; the
/// value itself is never quoted.
#[test]
fn pasted_text_bom_kept_quotes_and_typographic_quotes() {
    VaultDefinitions::parse("\u{feff}[{\"address\":\"http://v\",\"token\":\"t\"}]").unwrap();
    let e = err(r#"'[{"address":"http://v","token":"canary-token"}]'"#);
    assert!(e.contains("wrapped in ' quotes") && e.contains("remove them"), "{e}");
    assert!(!e.contains("canary-token"), "{e}");
    let e = err("[{\"address\":\"http://v\",\n \u{201c}token\u{201d}:\"canary-token\"}]");
    assert!(
        e.contains("typographic quote \u{201c} (U+201C) at line 2, column 2") && e.contains("straight quotes"),
        "{e}"
    );
    assert!(!e.contains("canary-token"), "{e}");

    // A secret value with a BOM (an AWS secret created from a Notepad file) is the JSON object.
    let r = super::support::reference(serde_json::json!({"type": "AWS", "region": "r", "secret_id": "s"}));
    let s = crate::secrets::value::from_text(&r, "\u{feff}{\"access_key\":\"a\",\"secret_key\":\"b\"}".into()).unwrap();
    assert_eq!(s.keys().collect::<Vec<_>>(), ["access_key", "secret_key"]);
    let e = crate::secrets::value::from_text(&r, "{\u{201c}access_key\u{201d}: \"a\"}".into()).unwrap_err();
    assert!(
        e.to_string().contains("U+201C") && e.to_string().contains("column 2"),
        "{e}"
    );
}

/// Secrets review N16: a login field of another method is refused by name, whichever method the
/// definition uses, instead of being silently ignored.
#[test]
fn fields_of_another_auth_method_are_refused() {
    for (definition, field) in [
        (
            r#"[{"address":"http://v","auth":"approle","role_id":"r","secret_id":"s","token":"t"}]"#,
            "token",
        ),
        (
            r#"[{"address":"http://v","auth":"kubernetes","role":"r","role_id":"x"}]"#,
            "role_id",
        ),
        (
            r#"[{"address":"http://v","auth":"jwt","jwt":"a","token_file":"/f"}]"#,
            "token_file",
        ),
        (
            r#"[{"address":"http://v","auth":"approle","role_id":"r","secret_id":"s","role":"x"}]"#,
            "role",
        ),
        (r#"[{"address":"http://v","token":"t","mount":"approle2"}]"#, "mount"),
        (r#"[{"address":"http://v","token":"t","region":"us-east-1"}]"#, "region"),
    ] {
        let e = err(definition);
        assert!(
            e.contains(&format!("field {field:?} is only used with")),
            "{definition}: {e}"
        );
    }
    let e = err(r#"[{"address":"http://v","auth":"approle","role_id":"r","secret_id":"s","role":"x"}]"#);
    assert!(e.contains("\"kubernetes\"") && e.contains("\"approle\""), "{e}");
    // What each method does use is accepted.
    VaultDefinitions::parse(
        r#"[{"address":"http://v","auth":"kubernetes","role":"r","mount":"k8s","token_file":"/t"}]"#,
    )
    .unwrap();
}

/// Cosmetic (secrets review §2): a definitions file's trailing comma is warned about once, not at
/// start-up and again at the first read.
#[tokio::test]
async fn a_definitions_file_is_read_once_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.json");
    std::fs::write(&path, r#"[{"address":"http://127.0.0.1:1","token":"t"},]"#).unwrap();
    let logs = super::support::LogCapture::default();
    let _guard = logs.install();
    let config = SecretsConfig {
        hashicorp_vault_config_file_path: Some(path),
        ..SecretsConfig::default()
    };
    let stores = SecretStores::from_config(&config).unwrap();
    let r = super::support::reference(
        serde_json::json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "x"}),
    );
    assert_eq!(stores.fetch(&r).await.unwrap_err().code(), "secret_store_unreachable");
    let text = logs.text();
    assert_eq!(text.matches("trailing comma").count(), 1, "{text}");
}

/// A `from_secret_store` definition may pin an Azure version or name a GCP location, as a
/// reference may.
#[test]
fn pointers_take_the_version_and_location_fields() {
    VaultDefinitions::parse(
        r#"[{"from_secret_store":"GCP","project":"p","secret_id":"s","location":"europe-west1"},
            {"from_secret_store":"AZURE","vault_url":"https://v.vault.azure.net","name":"n","version":"0f2c4e6a8b0d4f1e3a5c7e9b1d3f5a7c"}]"#,
    )
    .unwrap();
    let e = err(r#"[{"from_secret_store":"GCP","project":"p","secret_id":"s","region":"europe-west1"}]"#);
    assert!(e.contains("unknown field \"region\"") && e.contains("location"), "{e}");
}
