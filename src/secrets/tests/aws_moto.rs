//! The AWS store against moto (a real Secrets Manager API server).

use std::sync::Arc;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_secretsmanager::config::Credentials;
use aws_sdk_secretsmanager::types::Tag;
use serde_json::json;

use super::support::{ServerGuard, reference, start_moto, value_of};
use crate::secrets::{AwsStore, SecretRef, SecretStores};

pub async fn sdk_config(moto: &ServerGuard) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(moto.url("http"))
        .region("us-east-1")
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .load()
        .await
}

pub fn admin(sdk: &SdkConfig) -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::new(sdk)
}

pub async fn create(client: &aws_sdk_secretsmanager::Client, name: &str, value: &str, marked: bool) {
    let mut req = client.create_secret().name(name).secret_string(value);
    if marked {
        req = req.tags(Tag::builder().key("apono-connector-read").value("true").build());
    } else {
        req = req.tags(Tag::builder().key("team").value("platform").build());
    }
    req.send().await.expect("create secret");
}

fn aws_ref(secret_id: &str) -> SecretRef {
    reference(json!({"type": "AWS", "region": "us-east-1", "secret_id": secret_id}))
}

#[cfg_attr(
    not(apono_test_moto),
    ignore = "needs moto: run tests/run, or set APONO_TEST_MOTO_SERVER"
)]
#[tokio::test]
async fn reads_gates_and_sees_a_rotation_after_invalidation() {
    let moto = start_moto().await;
    let sdk = sdk_config(&moto).await;
    let admin = admin(&sdk);
    create(
        &admin,
        "rancher-api-key",
        r#"{"access_key":"token-abc","secret_key":"s1"}"#,
        true,
    )
    .await;
    create(&admin, "plain-token", "token-abc:s1", true).await;
    create(&admin, "unmarked", r#"{"k":"v"}"#, false).await;

    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(sdk.clone())));

    // Read (by name, and by ARN).
    let r = aws_ref("rancher-api-key");
    let s = stores.fetch(&r).await.unwrap();
    assert_eq!(value_of(&s, "access_key"), "token-abc");
    assert_eq!(value_of(&s, "secret_key"), "s1");
    let arn = admin
        .describe_secret()
        .secret_id("rancher-api-key")
        .send()
        .await
        .unwrap()
        .arn()
        .unwrap()
        .to_string();
    assert_eq!(
        value_of(&stores.fetch(&aws_ref(&arn)).await.unwrap(), "secret_key"),
        "s1"
    );
    assert_eq!(
        value_of(&stores.fetch(&aws_ref("plain-token")).await.unwrap(), "value"),
        "token-abc:s1"
    );

    // The tag gate, with the exact tag to add.
    let e = stores.fetch(&aws_ref("unmarked")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_marked", "{e}");
    assert!(e.to_string().contains("tag apono-connector-read=true"), "{e}");
    assert!(e.to_string().contains("tag-resource"), "{e}");

    // Not found.
    let e = stores.fetch(&aws_ref("no-such-secret")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_found", "{e}");

    // Rotation: cached until invalidated, then the new value without a restart.
    admin
        .put_secret_value()
        .secret_id("rancher-api-key")
        .secret_string(r#"{"access_key":"token-abc","secret_key":"s2"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "secret_key"), "s1");
    stores.invalidate(&r);
    assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "secret_key"), "s2");

    // Binary secrets are refused clearly.
    admin
        .create_secret()
        .name("binary")
        .secret_binary(aws_sdk_secretsmanager::primitives::Blob::new(vec![1u8, 2, 3]))
        .tags(Tag::builder().key("apono-connector-read").value("true").build())
        .send()
        .await
        .unwrap();
    let e = stores.fetch(&aws_ref("binary")).await.unwrap_err();
    assert!(e.to_string().contains("SecretBinary"), "{e}");

    let m = stores.metrics();
    assert_eq!(m[0].store, "AWS");
    assert!(m[0].errors.contains_key("secret_not_marked"));
}

/// One call of moto's IAM (AWS query protocol). moto routes by the credential scope of the
/// `Authorization` header and checks no signature while IAM is not enforced (set-up only).
async fn iam(moto: &ServerGuard, action: &str, params: &[(&str, &str)]) -> String {
    let mut form = vec![("Action", action), ("Version", "2010-05-08")];
    form.extend_from_slice(params);
    let response = reqwest::Client::new()
        .post(moto.url("http"))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
        )
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&form)
                .finish(),
        )
        .send()
        .await
        .expect("moto IAM");
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "IAM {action}: {status} {body}");
    body
}

fn xml_field(body: &str, field: &str) -> String {
    let open = format!("<{field}>");
    let start = body.find(&open).unwrap_or_else(|| panic!("no {field} in {body}")) + open.len();
    let end = start + body[start..].find('<').unwrap();
    body[start..end].to_string()
}

pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/apono-reader";
pub const EXTERNAL_ID: &str = "apono-external-id-7f3a";

/// In moto, as real AWS would have it: a user `connector` that may only call `sts:AssumeRole`,
/// and the role `apono-reader`, which may read secrets and trusts that user only when it
/// passes [`EXTERNAL_ID`]. Returns the user's access key. Then IAM is enforced.
pub async fn enforce_iam_with_a_reader_role(moto: &ServerGuard) -> Credentials {
    iam(moto, "CreateUser", &[("UserName", "connector")]).await;
    let key = iam(moto, "CreateAccessKey", &[("UserName", "connector")]).await;
    let only_assume = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": ROLE_ARN}]});
    iam(
        moto,
        "PutUserPolicy",
        &[
            ("UserName", "connector"),
            ("PolicyName", "assume-only"),
            ("PolicyDocument", &only_assume.to_string()),
        ],
    )
    .await;
    let trust = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole",
        "Principal": {"AWS": "arn:aws:iam::123456789012:user/connector"},
        "Condition": {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}}}]});
    iam(
        moto,
        "CreateRole",
        &[
            ("RoleName", "apono-reader"),
            ("AssumeRolePolicyDocument", &trust.to_string()),
        ],
    )
    .await;
    let read = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
        "Action": ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"], "Resource": "*"}]});
    iam(
        moto,
        "PutRolePolicy",
        &[
            ("RoleName", "apono-reader"),
            ("PolicyName", "read-secrets"),
            ("PolicyDocument", &read.to_string()),
        ],
    )
    .await;
    // From now on every request is authenticated and authorized against IAM.
    let r = reqwest::Client::new()
        .post(format!("{}/moto-api/reset-auth", moto.url("http")))
        .body("0")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    Credentials::new(
        xml_field(&key, "AccessKeyId"),
        xml_field(&key, "SecretAccessKey"),
        None,
        None,
        "moto-iam-user",
    )
}

/// T1: with IAM enforced, the connector's own identity cannot read the secret, so a read with
/// `role_arn` proves the role was assumed; and with a wrong `external_id` STS refuses the role
/// (so the field reaches STS).
#[cfg_attr(
    not(apono_test_moto),
    ignore = "needs moto: run tests/run, or set APONO_TEST_MOTO_SERVER"
)]
#[tokio::test]
async fn role_arn_assumes_the_role_through_sts() {
    let moto = start_moto().await;
    let sdk = sdk_config(&moto).await;
    create(&admin(&sdk), "cross-account", r#"{"token":"t"}"#, true).await;
    let user = enforce_iam_with_a_reader_role(&moto).await;
    let as_user = sdk
        .to_builder()
        .credentials_provider(aws_sdk_secretsmanager::config::SharedCredentialsProvider::new(user))
        .build();
    let stores = SecretStores::empty()
        .with_cache_ttl(std::time::Duration::ZERO)
        .with_store(Arc::new(AwsStore::with_sdk_config(as_user)));
    let r = |role: Option<&str>, external_id: Option<&str>| {
        let mut v = json!({"type": "AWS", "region": "us-east-1", "secret_id": "cross-account"});
        if let Some(role) = role {
            v["role_arn"] = json!(role);
        }
        if let Some(id) = external_id {
            v["external_id"] = json!(id);
        }
        reference(v)
    };

    // The user alone may not read.
    let e = stores.fetch(&r(None, None)).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");

    // As the role (with the external ID its trust policy asks for): read.
    let s = stores.fetch(&r(Some(ROLE_ARN), Some(EXTERNAL_ID))).await.unwrap();
    assert_eq!(value_of(&s, "token"), "t");

    // With a wrong external ID STS refuses the role, not retryable. (moto, unlike AWS, lets a
    // missing external ID through, so only a wrong one can show that the field reaches STS.)
    let e = stores.fetch(&r(Some(ROLE_ARN), Some("wrong-id"))).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(!e.retryable(), "{e}");
    assert!(e.to_string().contains(ROLE_ARN), "{e}");
}

#[tokio::test]
async fn unreachable_endpoint_is_retryable() {
    let port = super::support::free_port(false);
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .region("us-east-1")
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await;
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(sdk)));
    let e = stores.fetch(&aws_ref("x")).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_unreachable", "{e}");
    assert!(e.retryable());
}

/// A Secrets Manager that answers DescribeSecret with the read tag and GetSecretValue with
/// `status` and the JSON error `{"__type": kind, ...}` (the AWS JSON 1.1 protocol's error shape).
async fn failing_get(status: u16, kind: &'static str) -> SdkConfig {
    use axum::http::{HeaderMap, StatusCode};
    let app = axum::Router::new().fallback(move |headers: HeaderMap| async move {
        let target = headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let (code, body) = if target.ends_with("DescribeSecret") {
            (
                StatusCode::OK,
                json!({"Name": "s", "Tags": [{"Key": "apono-connector-read", "Value": "true"}]}),
            )
        } else {
            (
                StatusCode::from_u16(status).unwrap(),
                json!({"__type": kind, "message": format!("{kind} from the fake")}),
            )
        };
        (code, [("content-type", "application/x-amz-json-1.1")], body.to_string())
    });
    let addr = super::support::serve_http(app).await;
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(format!("http://{addr}"))
        .region("us-east-1")
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .load()
        .await
}

#[tokio::test]
async fn a_kms_decryption_failure_is_not_retried_and_names_kms_decrypt() {
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(
        failing_get(400, "DecryptionFailure").await,
    )));
    let e = stores.fetch(&aws_ref("s")).await.unwrap_err();
    assert!(!e.retryable(), "{e}");
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("kms:Decrypt"), "{e}");
    assert!(e.to_string().contains("DecryptionFailure from the fake"), "{e}");
}

#[tokio::test]
async fn an_invalid_parameter_is_not_retried_and_carries_the_store_message() {
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(
        failing_get(400, "InvalidParameterException").await,
    )));
    let e = stores.fetch(&aws_ref("s")).await.unwrap_err();
    assert!(!e.retryable(), "{e}");
    assert!(e.to_string().contains("InvalidParameterException from the fake"), "{e}");
}

#[tokio::test]
async fn an_unknown_server_error_stays_retryable() {
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(
        failing_get(500, "SomethingNew").await,
    )));
    let e = stores.fetch(&aws_ref("s")).await.unwrap_err();
    assert!(e.retryable(), "{e}");
    assert_eq!(e.code(), "secret_store_unreachable", "{e}");
}

/// Apono's IAM policy allows GetSecretValue only on tagged secrets: the denial says to add the tag.
#[tokio::test]
async fn access_denied_under_a_tag_conditioned_policy_says_add_the_tag() {
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(
        failing_get(400, "AccessDeniedException").await,
    )));
    let e = stores.fetch(&aws_ref("s")).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(!e.retryable());
    let text = e.to_string();
    assert!(text.contains("add the tag apono-connector-read=true"), "{e}");
    assert!(text.contains("tag-resource --region us-east-1 --secret-id s"), "{e}");
}

/// K2: a Secrets Manager endpoint that accepts and never answers: each attempt ends at its time
/// limit, the SDK's retries are bounded, and the error is retryable and says it timed out.
#[tokio::test]
async fn a_stalled_endpoint_times_out_per_attempt() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
    });
    let addr = super::support::serve_http(app).await;
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(format!("http://{addr}"))
        .region("us-east-1")
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(std::time::Duration::from_millis(500))
                .build(),
        )
        .load()
        .await;
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(sdk)));
    let e = tokio::time::timeout(std::time::Duration::from_secs(45), stores.fetch(&aws_ref("s")))
        .await
        .expect("the AWS store gave up by itself, well inside the registry's limit")
        .unwrap_err();
    assert!(e.retryable(), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert_eq!(requests.load(Ordering::SeqCst), 2);
}

#[cfg_attr(
    not(apono_test_moto),
    ignore = "needs moto: run tests/run, or set APONO_TEST_MOTO_SERVER"
)]
#[tokio::test]
async fn a_pinned_version_stage_or_id_is_read() {
    let moto = start_moto().await;
    let sdk = sdk_config(&moto).await;
    let admin = admin(&sdk);
    create(&admin, "rotated", r#"{"k":"old"}"#, true).await;
    let old_id = admin
        .get_secret_value()
        .secret_id("rotated")
        .send()
        .await
        .unwrap()
        .version_id()
        .unwrap()
        .to_string();
    admin
        .put_secret_value()
        .secret_id("rotated")
        .secret_string(r#"{"k":"new"}"#)
        .send()
        .await
        .unwrap();
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(sdk.clone())));
    let pinned = |field: &str, value: &str| {
        reference(json!({"type": "AWS", "region": "us-east-1", "secret_id": "rotated", field: value}))
    };
    assert_eq!(value_of(&stores.fetch(&aws_ref("rotated")).await.unwrap(), "k"), "new");
    let previous = pinned("version_stage", "AWSPREVIOUS");
    assert_eq!(value_of(&stores.fetch(&previous).await.unwrap(), "k"), "old");
    assert_eq!(previous.describe(), "AWS us-east-1/rotated@AWSPREVIOUS");
    assert_eq!(
        value_of(&stores.fetch(&pinned("version_id", &old_id)).await.unwrap(), "k"),
        "old"
    );
    // A stage no version carries is not found, not retried.
    let e = stores.fetch(&pinned("version_stage", "NOSUCHSTAGE")).await.unwrap_err();
    assert!(!e.retryable(), "{e}");
}

/// Fields pasted with spaces still read; an empty or impossible region is the reference's fault,
/// named, and not retried (it was `unreachable`, retried forever: secrets review N12).
#[cfg_attr(
    not(apono_test_moto),
    ignore = "needs moto: run tests/run, or set APONO_TEST_MOTO_SERVER"
)]
#[tokio::test]
async fn pasted_spaces_are_trimmed_and_a_bad_region_is_a_misconfiguration() {
    let moto = start_moto().await;
    let sdk = sdk_config(&moto).await;
    create(&admin(&sdk), "pasted", r#"{"k":"v"}"#, true).await;
    let stores = SecretStores::empty().with_store(Arc::new(AwsStore::with_sdk_config(sdk.clone())));
    let with = |region: &str, id: &str| reference(json!({"type": "AWS", "region": region, "secret_id": id}));
    assert_eq!(
        value_of(&stores.fetch(&with("us-east-1 ", " pasted ")).await.unwrap(), "k"),
        "v"
    );
    for (region, id, named) in [
        ("", "pasted", "region"),
        ("us-east-1", " ", "secret_id"),
        ("not a region!", "pasted", "region"),
    ] {
        let e = stores.fetch(&with(region, id)).await.unwrap_err();
        assert_eq!(e.code(), "secret_store_misconfigured", "{region:?}/{id:?}: {e}");
        assert!(!e.retryable(), "{e}");
        assert!(e.to_string().contains(named), "{e}");
    }
}

/// Issue 18: one SDK client per region / role / profile, shared by every read, whatever the
/// number of reads. (Connections are counted at the GCP, Kubernetes and OpenBao servers: moto
/// answers `Connection: close` to every request, so its count is one per request whatever the
/// client does.)
#[cfg_attr(
    not(apono_test_moto),
    ignore = "needs moto: run tests/run, or set APONO_TEST_MOTO_SERVER"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reads_build_one_client_per_configuration() {
    let moto = start_moto().await;
    let sdk = sdk_config(&moto).await;
    create(&admin(&sdk), "rancher-api-key", "token-abc:s1", true).await;
    let store = Arc::new(AwsStore::with_sdk_config(sdk));
    let stores = SecretStores::empty()
        .with_store(store.clone())
        .with_cache_ttl(std::time::Duration::ZERO);
    let r = aws_ref("rancher-api-key");
    for _ in 0..30 {
        assert_eq!(value_of(&stores.fetch(&r).await.unwrap(), "value"), "token-abc:s1");
    }
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (stores, r) = (stores.clone(), r.clone());
            tokio::spawn(async move { stores.fetch(&r).await.map(|_| ()) })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.clients_built(), 1);
    // Another region is another configuration: one more client, built once.
    let other = reference(json!({"type": "AWS", "region": "eu-west-1", "secret_id": "rancher-api-key"}));
    for _ in 0..3 {
        let _ = stores.fetch(&other).await;
    }
    assert_eq!(store.clients_built(), 2);
}
