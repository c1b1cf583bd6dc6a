//! AWS credentials from the shared config file's profiles (the default chain, no keys in the
//! environment): `credential_process` (how IAM Roles Anywhere's signing helper plugs in), chosen
//! by the reference's `profile` or by `AWS_PROFILE`. moto enforces IAM here, so only the keys the
//! process prints can read, and only through the role.
//!
//! The environment is process-wide, so each read runs in a child process (this test binary
//! again, running only the ignored `profile_child`).

use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use super::aws_moto::{EXTERNAL_ID, ROLE_ARN, admin, create, enforce_iam_with_a_reader_role, sdk_config};
use super::support::{reference, start_moto, value_of};
use crate::secrets::{AwsStore, SecretStores};

#[cfg_attr(
    not(apono_test_moto),
    ignore = "needs moto: run tests/run, or set APONO_TEST_MOTO_SERVER"
)]
#[tokio::test]
async fn credential_process_profile_by_reference_or_aws_profile() {
    let moto = start_moto().await;
    let sdk = sdk_config(&moto).await;
    create(&admin(&sdk), "via-profile", r#"{"token":"from-profile"}"#, true).await;
    let user = enforce_iam_with_a_reader_role(&moto).await;

    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("process-ran");
    let script = dir.path().join("signing-helper.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho ran >> '{}'\nprintf '%s' '{}'\n",
            marker.display(),
            json!({"Version": 1, "AccessKeyId": user.access_key_id(), "SecretAccessKey": user.secret_access_key()})
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = us-east-1\n\n[profile apono]\ncredential_process = {}\n",
            script.display()
        ),
    )
    .unwrap();

    // (how the profile is chosen, variables)
    let modes: [(&str, Vec<(&str, &str)>); 3] = [
        ("reference's profile", vec![("APONO_TEST_AWS_PROFILE_FIELD", "apono")]),
        ("AWS_PROFILE", vec![("AWS_PROFILE", "apono")]),
        (
            "no such profile",
            vec![
                ("APONO_TEST_AWS_PROFILE_FIELD", "missing"),
                ("APONO_TEST_AWS_EXPECT", "refused"),
            ],
        ),
    ];
    for (mode, vars) in modes {
        let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "secrets::tests::aws_profiles::profile_child",
            "--ignored",
            "--nocapture",
        ])
        .env("APONO_TEST_CHILD", "1")
        .env("AWS_ENDPOINT_URL", moto.url("http"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", &config)
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"));
        for name in [
            "AWS_PROFILE",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        ] {
            cmd.env_remove(name);
        }
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let _ = std::fs::remove_file(&marker);
        let out = cmd.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{mode}: child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !mode.starts_with("no such") {
            assert!(marker.exists(), "{mode}: the credential process was not run");
        }
    }
}

#[tokio::test]
#[ignore = "run by credential_process_profile_by_reference_or_aws_profile in a child process"]
async fn profile_child() {
    if std::env::var_os("APONO_TEST_CHILD").is_none() {
        return;
    }
    let mut r = json!({
        "type": "AWS", "region": "us-east-1", "secret_id": "via-profile",
        "role_arn": ROLE_ARN, "external_id": EXTERNAL_ID,
    });
    if let Ok(profile) = std::env::var("APONO_TEST_AWS_PROFILE_FIELD") {
        r["profile"] = json!(profile);
    }
    let stores = SecretStores::empty().with_store(std::sync::Arc::new(AwsStore::new()));
    let result = stores.fetch(&reference(r)).await;
    if std::env::var("APONO_TEST_AWS_EXPECT").as_deref() == Ok("refused") {
        let e = result.unwrap_err();
        assert!(!e.retryable(), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    } else {
        assert_eq!(value_of(&result.unwrap(), "token"), "from-profile");
    }
}
