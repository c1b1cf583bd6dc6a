//! The stores of the one-shot commands (`secret get`, `discover`, ...), configured by the
//! environment alone: `AWS_ENDPOINT_URL` and the SDK's credential variables for AWS,
//! `HASHICORP_VAULT_CONFIG` for Vault (read by `config`, the stores built from those settings).
//!
//! The environment is process-wide, so the reads run in a child process: this test binary again,
//! running only the ignored `child_reads_through_default` with the variables set.

use serde_json::json;

use super::support::{reference, start_bao, start_moto, value_of};
use super::vault_bao::Bao;
use crate::secrets::SecretStores;

#[cfg_attr(
    not(all(apono_test_moto, apono_test_bao)),
    ignore = "needs moto and OpenBao: run tests/run, or set APONO_TEST_MOTO_SERVER and APONO_TEST_BAO"
)]
#[tokio::test]
async fn default_reads_aws_and_vault_configured_by_environment() {
    let moto = start_moto().await;
    let bao_guard = start_bao(false).await;
    let sdk = super::aws_moto::sdk_config(&moto).await;
    super::aws_moto::create(
        &super::aws_moto::admin(&sdk),
        "from-env",
        r#"{"token":"aws-env"}"#,
        true,
    )
    .await;
    let bao = Bao::new(&bao_guard, "http");
    bao.post("secret/data/from-env", json!({"data": {"token": "vault-env"}}))
        .await;
    let token = bao.reader_token().await;
    bao.post("secret/data/apono/from-env", json!({"data": {"token": "vault-env"}}))
        .await;

    // Static keys from the environment, then web identity (IRSA: a token file and a role, the
    // role assumed through moto's STS), with no keys at all.
    let dir = tempfile::tempdir().unwrap();
    let web_token = dir.path().join("web-identity-token");
    std::fs::write(
        &web_token,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6YXBvbm8ifQ.c2ln",
    )
    .unwrap();
    let modes: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "static keys",
            vec![
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ],
        ),
        (
            "web identity",
            vec![
                ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/apono-connector".into()),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", web_token.display().to_string()),
            ],
        ),
        (
            "no credentials",
            vec![("APONO_TEST_AWS_EXPECT", "no-credentials".into())],
        ),
    ];
    for (mode, vars) in modes {
        let mut cmd = super::support::aws_child("secrets::tests::env_default::child_reads_through_default");
        cmd.env("AWS_ENDPOINT_URL", moto.url("http"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", dir.path().join("none"))
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
            .env(
                "HASHICORP_VAULT_CONFIG",
                json!([{"address": bao.base, "token": token}]).to_string(),
            )
            .env("APONO_SECRET_CACHE_TTL_SECONDS", "0");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{mode}: child failed:\n{stdout}\n{stderr}"
        );
    }
}

#[tokio::test]
#[ignore = "run by default_reads_aws_and_vault_configured_by_environment in a child process"]
async fn child_reads_through_default() {
    if std::env::var_os("APONO_TEST_CHILD").is_none() {
        return;
    }
    let stores = crate::commands::secret_stores_from_env().unwrap();
    let aws = reference(json!({"type": "AWS", "region": "us-east-1", "secret_id": "from-env"}));
    if std::env::var("APONO_TEST_AWS_EXPECT").as_deref() == Ok("no-credentials") {
        let e = stores.fetch(&aws).await.unwrap_err();
        assert_eq!(e.code(), "secret_not_permitted", "{e}");
        assert!(e.to_string().contains("no AWS credentials"), "{e}");
    } else {
        assert_eq!(value_of(&stores.fetch(&aws).await.unwrap(), "token"), "aws-env");
    }
    let vault = reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "apono/from-env"}));
    assert_eq!(value_of(&stores.fetch(&vault).await.unwrap(), "token"), "vault-env");
    // The lenient default reads none of the connector's variables: its settings are the defaults.
    let e = SecretStores::default().fetch(&vault).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
}
