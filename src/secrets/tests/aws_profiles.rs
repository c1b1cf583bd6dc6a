//! AWS credentials from the shared config file's profiles (the default chain, no keys in the
//! environment): `credential_process` (how IAM Roles Anywhere's signing helper plugs in), chosen
//! by the reference's `profile` or by `AWS_PROFILE`, and an `sso_session` profile (IAM Identity
//! Center) whose portal is a small wire fake (moto has none). moto enforces IAM here, so only the
//! keys the process or the portal hand out can read, and only through the role.
//!
//! The environment is process-wide, so each read runs in a child process (this test binary
//! again, running only the ignored `profile_child`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};

use axum::extract::Query;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use super::aws_moto::{EXTERNAL_ID, ROLE_ARN, admin, create, enforce_iam_with_a_reader_role, sdk_config};
use super::support::{reference, serve_http, start_moto, value_of};
use crate::secrets::{AwsStore, SecretStores};

#[cfg_attr(
    not(apono_test_moto),
    ignore = "needs moto: run tests/run, or set APONO_TEST_MOTO_SERVER"
)]
#[tokio::test]
async fn credential_process_and_sso_profiles() {
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

    // IAM Identity Center: the portal hands out the user's keys for a valid bearer token, which
    // `aws sso login` would have cached under ~/.aws/sso/cache/<sha1 of the session name>.json.
    let portal_calls = Arc::new(Mutex::new(Vec::new()));
    let portal = {
        let calls = portal_calls.clone();
        let keys = (user.access_key_id().to_string(), user.secret_access_key().to_string());
        axum::Router::new().route(
            "/federation/credentials",
            axum::routing::get(
                move |headers: HeaderMap, Query(q): Query<HashMap<String, String>>| async move {
                    let token = headers.get("x-amz-sso_bearer_token").and_then(|v| v.to_str().ok());
                    calls.lock().unwrap().push(format!("{q:?}"));
                    if token != Some(SSO_TOKEN)
                        || q.get("role_name").map(String::as_str) != Some("ConnectorRead")
                        || q.get("account_id").map(String::as_str) != Some("123456789012")
                    {
                        return (
                            StatusCode::UNAUTHORIZED,
                            axum::Json(json!({"message": "Session token not found or invalid"})),
                        )
                            .into_response();
                    }
                    let expiration = (std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64;
                    let body = json!({"roleCredentials": {
                    "accessKeyId": keys.0, "secretAccessKey": keys.1, "sessionToken": null, "expiration": expiration}});
                    axum::Json(body).into_response()
                },
            ),
        )
    };
    let portal_addr = serve_http(portal).await;
    let home = dir.path().join("home");
    let cache = home.join(".aws/sso/cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(
        cache.join(format!("{}.json", sha1_hex("corp"))),
        json!({"accessToken": SSO_TOKEN, "expiresAt": "2099-01-01T00:00:00Z", "region": "us-east-1",
               "startUrl": "https://corp.awsapps.com/start"})
        .to_string(),
    )
    .unwrap();

    let config = dir.path().join("config");
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = us-east-1\n\n[profile apono]\ncredential_process = {}\n\n\
             [profile apono-sso]\nsso_session = corp\nsso_account_id = 123456789012\n\
             sso_role_name = ConnectorRead\nregion = us-east-1\n\n\
             [sso-session corp]\nsso_start_url = https://corp.awsapps.com/start\nsso_region = us-east-1\n",
            script.display()
        ),
    )
    .unwrap();
    let portal_url = format!("http://{portal_addr}");

    // (how the profile is chosen, variables)
    let modes: [(&str, Vec<(&str, &str)>); 4] = [
        ("reference's profile", vec![("APONO_TEST_AWS_PROFILE_FIELD", "apono")]),
        (
            "sso_session profile",
            vec![("APONO_TEST_AWS_PROFILE_FIELD", "apono-sso")],
        ),
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
        let mut cmd = super::support::aws_child("secrets::tests::aws_profiles::profile_child");
        cmd.env("AWS_ENDPOINT_URL", moto.url("http"))
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", &config)
            .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
            .env("AWS_ENDPOINT_URL_SSO", &portal_url)
            .env("HOME", &home);
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
        match mode {
            "sso_session profile" => assert_eq!(portal_calls.lock().unwrap().len(), 1, "{mode}: the portal was asked"),
            "no such profile" => {}
            _ => assert!(marker.exists(), "{mode}: the credential process was not run"),
        }
    }
}

const SSO_TOKEN: &str = "fake-sso-access-token";

/// The SDK's cache file name for an SSO session (`sha1sum`, as the crate that computes it is
/// not a dependency of ours).
fn sha1_hex(text: &str) -> String {
    let out = std::process::Command::new("sha1sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("sha1sum");
    String::from_utf8(out.stdout).unwrap()[..40].to_string()
}

#[tokio::test]
#[ignore = "run by credential_process_and_sso_profiles in a child process"]
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
