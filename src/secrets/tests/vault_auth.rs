//! Vault auth methods against OpenBao: JWT/OIDC (a JWT signed by a key made here), TLS certificate
//! (a CA and client certificate made here, OpenBao on its dev TLS), a client certificate with token
//! auth, AWS IAM (OpenBao asks moto's STS who signed the request); and what their definitions and
//! errors may not show.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::SecretString;
use serde_json::{Value, json};

use super::support::{BAO_ROOT, LogCapture, reference, start_bao, value_of};
use super::vault_bao::Bao;
use crate::config::SecretsConfig;
use crate::secrets::{SecretError, SecretRef, SecretStore, SecretStores, VaultDefinitions, VaultStore};

fn vault(definitions: Value) -> VaultStore {
    VaultStore::new(VaultDefinitions::parse(&definitions.to_string()).unwrap(), vec![])
}

fn rancher_ref() -> SecretRef {
    reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "apono/rancher"}))
}

async fn read(store: &VaultStore) -> Result<String, SecretError> {
    store.fetch(&rancher_ref()).await.map(|s| value_of(&s, "token"))
}

/// OpenBao with `secret/apono/rancher` = {token: `value`} and the `reader` policy.
async fn bao_with_secret(tls: bool, value: &str) -> (super::support::ServerGuard, Bao) {
    let guard = start_bao(tls).await;
    let bao = Bao::new(&guard, if tls { "https" } else { "http" });
    bao.post("secret/data/apono/rancher", json!({"data": {"token": value}}))
        .await;
    bao.reader_token().await; // creates the policy
    (guard, bao)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// An RS256 JWT signed with `key`.
fn sign_jwt(key: &rcgen::KeyPair, claims: &Value) -> String {
    use rcgen::SigningKey;
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    let input = format!(
        "{}.{}",
        b64(json!({"alg": "RS256", "typ": "JWT"}).to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = key.sign(input.as_bytes()).unwrap();
    format!("{input}.{}", b64(&signature))
}

fn claims(audience: &str) -> Value {
    json!({
        "iss": "https://ci.example.com",
        "sub": "system:serviceaccount:apono:apono-connector",
        "aud": audience,
        "iat": now() - 10,
        "nbf": now() - 10,
        "exp": now() + 600,
    })
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn jwt_auth_reads_rereads_the_file_and_names_the_role_it_was_refused() {
    let (_guard, bao) = bao_with_secret(false, "via-jwt").await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    bao.post("sys/auth/jwt", json!({"type": "jwt"})).await;
    bao.post(
        "auth/jwt/config",
        json!({"jwt_validation_pubkeys": [key.public_key_pem()], "bound_issuer": "https://ci.example.com"}),
    )
    .await;
    bao.post(
        "auth/jwt/role/apono",
        json!({"role_type": "jwt", "user_claim": "sub", "bound_audiences": ["vault"],
               "bound_subject": "system:serviceaccount:apono:apono-connector", "token_policies": ["reader"]}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let jwt_file = dir.path().join("token");

    // A JWT for another audience: refused, not retryable, naming the role and what to check.
    std::fs::write(&jwt_file, sign_jwt(&key, &claims("not-vault"))).unwrap();
    let store = vault(json!([{"address": bao.base, "auth": "jwt", "role": "apono", "jwt_file": jwt_file}]));
    let e = read(&store).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(!e.retryable());
    let text = e.to_string();
    assert!(
        text.contains("JWT login") && text.contains("role \"apono\"") && text.contains("bound_audiences"),
        "{e}"
    );

    // The file is re-read at the next login (a projected token rotated): the same store now reads.
    std::fs::write(&jwt_file, sign_jwt(&key, &claims("vault"))).unwrap();
    assert_eq!(read(&store).await.unwrap(), "via-jwt");

    // The JWT inline, and the role from a custom mount path.
    bao.post("sys/auth/ci-jwt", json!({"type": "jwt"})).await;
    bao.post(
        "auth/ci-jwt/config",
        json!({"jwt_validation_pubkeys": [key.public_key_pem()], "default_role": "ci"}),
    )
    .await;
    bao.post(
        "auth/ci-jwt/role/ci",
        json!({"role_type": "jwt", "user_claim": "sub", "bound_audiences": ["vault"], "token_policies": ["reader"]}),
    )
    .await;
    let inline = vault(
        json!([{"address": bao.base, "auth": "jwt", "mount": "ci-jwt", "role": "ci",
                               "jwt": sign_jwt(&key, &claims("vault"))}]),
    );
    assert_eq!(read(&inline).await.unwrap(), "via-jwt");
    // No role: the mount's default_role.
    let default_role = vault(json!([{"address": bao.base, "auth": "jwt", "mount": "ci-jwt",
                                     "jwt": sign_jwt(&key, &claims("vault"))}]));
    assert_eq!(read(&default_role).await.unwrap(), "via-jwt");

    // Signed by a key the mount does not trust; expired.
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let unsigned = vault(json!([{"address": bao.base, "auth": "jwt", "role": "apono",
                                 "jwt": sign_jwt(&stranger, &claims("vault"))}]));
    let e = read(&unsigned).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    let mut old = claims("vault");
    old["exp"] = json!(now() - 3600);
    let expired = vault(json!([{"address": bao.base, "auth": "jwt", "role": "apono", "jwt": sign_jwt(&key, &old)}]));
    let e = read(&expired).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("expired"), "{e}");

    // A role the mount does not have: Vault's answer names it.
    let no_role =
        vault(json!([{"address": bao.base, "auth": "jwt", "role": "nope", "jwt": sign_jwt(&key, &claims("vault"))}]));
    let e = read(&no_role).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(e.to_string().contains("role \"nope\""), "{e}");

    // No file: says which file, and that it is a configuration problem.
    let missing = vault(json!([{"address": bao.base, "auth": "jwt", "role": "apono",
                                "jwt_file": dir.path().join("nope")}]));
    let e = read(&missing).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
    assert!(
        e.to_string().contains("jwt_file") && e.to_string().contains("nope"),
        "{e}"
    );
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn jwt_tokens_are_renewed_before_they_expire() {
    let (_guard, bao) = bao_with_secret(false, "still-readable").await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    bao.post("sys/auth/jwt", json!({"type": "jwt"})).await;
    bao.post(
        "auth/jwt/config",
        json!({"jwt_validation_pubkeys": [key.public_key_pem()]}),
    )
    .await;
    // A 9 s token; reads 6.5 s apart (past two thirds of its life, 2.5 s before it expires).
    bao.post(
        "auth/jwt/role/apono",
        json!({"role_type": "jwt", "user_claim": "sub", "bound_audiences": ["vault"], "token_policies": ["reader"],
               "token_ttl": "9s", "token_max_ttl": "60s"}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let jwt_file = dir.path().join("token");
    std::fs::write(&jwt_file, sign_jwt(&key, &claims("vault"))).unwrap();
    let store = vault(json!([{"address": bao.base, "auth": "jwt", "role": "apono", "jwt_file": jwt_file}]));
    assert_eq!(read(&store).await.unwrap(), "still-readable");
    // After the first login the JWT is gone: only renewing the token keeps reads working.
    std::fs::write(&jwt_file, "not-a-jwt").unwrap();
    for _ in 0..2 {
        tokio::time::sleep(std::time::Duration::from_millis(6500)).await;
        assert_eq!(read(&store).await.unwrap(), "still-readable");
    }
}

/// A CA, and a client certificate it signed for `name`: (CA PEM, certificate PEM, key PEM).
fn client_certificate(name: &str) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "apono test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn cert_auth_and_a_client_certificate_with_token_auth() {
    let (guard, bao) = bao_with_secret(true, "via-cert").await;
    let bao_ca = STANDARD.encode(std::fs::read(guard.dir.path().join("vault-ca.pem")).unwrap());
    let (ca, cert, key) = client_certificate("apono-connector");
    bao.post("sys/auth/cert", json!({"type": "cert"})).await;
    bao.post(
        "auth/cert/certs/apono",
        json!({"certificate": ca, "allowed_common_names": ["apono-connector"], "token_policies": ["reader"]}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, &key).unwrap();

    // Files; inline base64. A successful login proves the certificate was presented: OpenBao
    // has no other way to know it.
    let files = vault(
        json!([{"address": bao.base, "ca_cert_base64": bao_ca, "auth": "cert", "role": "apono",
                              "client_cert": cert_file, "client_key": key_file}]),
    );
    assert_eq!(read(&files).await.unwrap(), "via-cert");
    let inline = vault(json!([{"address": bao.base, "ca_cert_base64": bao_ca, "auth": "cert",
                               "client_cert_base64": STANDARD.encode(&cert), "client_key_base64": STANDARD.encode(&key)}]));
    assert_eq!(read(&inline).await.unwrap(), "via-cert");

    // Token auth over a connection that presents a client certificate.
    let token = vault(
        json!([{"address": bao.base, "ca_cert_base64": bao_ca, "token": BAO_ROOT,
                              "client_cert": cert_file, "client_key": key_file}]),
    );
    assert_eq!(read(&token).await.unwrap(), "via-cert");

    // A certificate from a CA the mount does not trust: refused, naming the method and the role.
    let (_, other_cert, other_key) = client_certificate("apono-connector");
    let unknown = vault(
        json!([{"address": bao.base, "ca_cert_base64": bao_ca, "auth": "cert", "role": "apono",
                                "client_cert_base64": STANDARD.encode(other_cert),
                                "client_key_base64": STANDARD.encode(other_key)}]),
    );
    let e = read(&unknown).await.unwrap_err();
    assert_eq!(e.code(), "secret_not_permitted", "{e}");
    assert!(!e.retryable());
    assert!(
        e.to_string().contains("TLS certificate login") && e.to_string().contains("role \"apono\""),
        "{e}"
    );

    // A key file that is not there: the field and the path.
    let missing = vault(json!([{"address": bao.base, "ca_cert_base64": bao_ca, "auth": "cert",
                                "client_cert": cert_file, "client_key": dir.path().join("missing.key")}]));
    let e = read(&missing).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_misconfigured", "{e}");
    assert!(
        e.to_string().contains("client_key") && e.to_string().contains("missing.key"),
        "{e}"
    );

    // A renewed certificate (cert-manager rewrites the files), from a new CA whose role also
    // grants `rotated/`: the same store reconnects with it and logs in again, so it can read
    // what the first login's token could not.
    bao.post("secret/data/rotated/x", json!({"data": {"token": "after-renewal"}}))
        .await;
    bao.post(
        "sys/policies/acl/rotated",
        json!({"policy": "path \"secret/data/rotated/*\" { capabilities = [\"read\"] }"}),
    )
    .await;
    let (new_ca, new_cert, new_key) = client_certificate("apono-connector");
    bao.post(
        "auth/cert/certs/apono",
        json!({"certificate": new_ca, "allowed_common_names": ["apono-connector"], "token_policies": ["reader", "rotated"]}),
    )
    .await;
    std::fs::write(&cert_file, &new_cert).unwrap();
    std::fs::write(&key_file, format!("{new_key}\n")).unwrap();
    let rotated = reference(json!({"type": "HASHICORP_VAULT", "secret_engine": "secret", "path": "rotated/x"}));
    let s = files.fetch(&rotated).await.unwrap();
    assert_eq!(value_of(&s, "token"), "after-renewal");
}

/// A definition holding a planted JWT, client key and token shows them in no parse error, login
/// error, `Debug` output or log line (trace level).
#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn planted_jwt_key_and_token_never_show() {
    const CANARY: &str = "CANARY-vault-auth-5f3a";
    let logs = LogCapture::default();
    let _guard = logs.install();
    let (_bao_guard, bao) = bao_with_secret(false, "x").await;
    bao.post("sys/auth/jwt", json!({"type": "jwt"})).await;
    let (_, cert, key) = client_certificate("apono-connector");
    // The canary inside a PEM key (as a comment line before the block) and as the JWT.
    let key_with_canary = format!("{CANARY}\n{key}");
    let definitions = json!([
        {"address": bao.base, "auth": "jwt", "role": "apono", "jwt": format!("{CANARY}.{CANARY}.{CANARY}")},
        {"address": bao.base, "auth": "approle", "role_id": "r", "secret_id": CANARY,
         "client_cert_base64": STANDARD.encode(&cert), "client_key_base64": STANDARD.encode(&key_with_canary)},
        {"address": bao.base, "token": CANARY, "name": "t"},
    ]);
    let config = SecretsConfig {
        hashicorp_vault_config: Some(SecretString::from(definitions.to_string())),
        cache_ttl_seconds: 0,
        ..SecretsConfig::default()
    };
    let mut shown = vec![format!("{config:?}")];
    let stores = SecretStores::from_config(&config).unwrap();
    shown.push(stores.fetch(&rancher_ref()).await.unwrap_err().to_string());
    for (i, definition) in definitions.as_array().unwrap().iter().enumerate() {
        shown.push(
            vault(json!([definition]))
                .fetch(&rancher_ref())
                .await
                .unwrap_err()
                .to_string(),
        );
        // Broken in another field: the parse error names it, not the secret beside it.
        let mut broken = definition.clone();
        broken["skip_verify"] = json!("sometimes");
        let e = VaultDefinitions::parse(&json!([broken]).to_string()).err().unwrap();
        shown.push(format!("{e} {e:?}"));
        let mut misplaced = definition.clone();
        misplaced["region"] = json!(CANARY);
        if let Err(e) = VaultDefinitions::parse(&json!([misplaced]).to_string()) {
            shown.push(format!("{e} {e:?}"));
        } else {
            panic!("definition {i}: region accepted outside aws auth");
        }
    }
    // A key that does not match its certificate, inline: refused at parse, without the key.
    let (_, _, other_key) = client_certificate("x");
    let e = VaultDefinitions::parse(
        &json!([{"address": "https://v", "token": "t", "client_cert_base64": STANDARD.encode(&cert),
                 "client_key_base64": STANDARD.encode(format!("{CANARY}\n{other_key}"))}])
        .to_string(),
    );
    if let Err(e) = e {
        shown.push(e.to_string());
    }
    shown.push(logs.text());
    for text in shown {
        assert!(!text.contains(CANARY), "leaked: {text}");
    }
}

#[test]
fn new_fields_are_checked_by_name() {
    let err = |v: Value| match VaultDefinitions::parse(&v.to_string()) {
        Ok(_) => panic!("accepted: {v}"),
        Err(e) => e.to_string(),
    };
    let e = err(json!([{"address": "http://v", "auth": "jwt", "role": "r"}]));
    assert!(e.contains("jwt_file"), "{e}");
    let e = err(json!([{"address": "http://v", "auth": "jwt", "jwt": "a", "jwt_file": "/f"}]));
    assert!(e.contains("not both"), "{e}");
    let e = err(json!([{"address": "http://v", "token": "t", "jwt": "a"}]));
    assert!(e.contains("\"jwt\" is only used with \"auth\": \"jwt\""), "{e}");
    let e = err(json!([{"address": "https://v", "auth": "cert"}]));
    assert!(e.contains("client_cert") && e.contains("client_key"), "{e}");
    let e = err(json!([{"address": "http://v", "auth": "cert", "client_cert": "/c", "client_key": "/k"}]));
    assert!(e.contains("https://"), "{e}");
    let e = err(json!([{"address": "http://v", "token": "t", "client_cert": "/c"}]));
    assert!(e.contains("\"client_key\""), "{e}");
    let e = err(json!([{"address": "http://v", "token": "t", "client_cert_base64": "!!", "client_key": "/k"}]));
    assert!(e.contains("\"client_cert_base64\""), "{e}");
    let e = err(json!([{"address": "http://v", "auth": "kerberos"}]));
    assert!(e.contains("jwt, cert or aws"), "{e}");
    let e = err(json!([{"address": "http://v", "auth": "jwt", "jwt": "a", "jwtfile": "/f"}]));
    assert!(e.contains("unknown field \"jwtfile\""), "{e}");
    // An EC key as `openssl ecparam -genkey` writes it (parameters block first) is accepted.
    let (_, cert, key) = client_certificate("x");
    let key = format!("-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{key}");
    VaultDefinitions::parse(
        &json!([{"address": "https://v", "auth": "cert", "client_cert_base64": STANDARD.encode(cert),
                 "client_key_base64": STANDARD.encode(key)}])
        .to_string(),
    )
    .unwrap();
    #[cfg(not(feature = "vault-aws-auth"))]
    {
        let e = err(json!([{"address": "http://v", "auth": "aws", "role": "r"}]));
        assert!(e.contains("vault-aws-auth"), "{e}");
    }
    #[cfg(feature = "vault-aws-auth")]
    VaultDefinitions::parse(
        &json!([{"address": "https://v", "auth": "aws", "role": "r", "region": "eu-west-1", "header_value": "v"}])
            .to_string(),
    )
    .unwrap();
}

/// The caller moto's STS names for keys it did not issue.
#[cfg(feature = "vault-aws-auth")]
const MOTO_CALLER: &str = "arn:aws:sts::123456789012:user/moto";

/// OpenBao (2.x) ships no `aws` auth method ("plugin not found in the catalog: aws"), and no
/// registry reachable here has HashiCorp Vault or the plugin. So this fake stands in for Vault's
/// `auth/aws/login` alone, doing what Vault's IAM login does: it checks the method, body, URL and
/// the signed `X-Vault-AWS-IAM-Server-ID` header, verifies the SigV4 signature over what was sent
/// (moto does not), sends the request to STS (moto) and binds the caller it names to the role.
/// Every other path is passed to OpenBao, which serves the KV read with the token it returns.
#[cfg(feature = "vault-aws-auth")]
async fn vault_aws_login_fake(
    bao: String,
    sts: String,
    token: String,
    roles: Vec<(&'static str, &'static str)>,
) -> String {
    use axum::Json;
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};

    const SERVER_ID: &str = "vault.apono.test";
    fn refuse(why: String) -> Response {
        (StatusCode::BAD_REQUEST, Json(json!({"errors": [why]}))).into_response()
    }
    let http = reqwest::Client::new();
    let login = {
        let http = http.clone();
        // vaultrs sends JSON without a Content-Type, which axum's `Json` refuses.
        move |raw: Bytes| {
            let (http, sts, roles, token) = (http.clone(), sts.clone(), roles.clone(), token.clone());
            async move {
                let login: Value = serde_json::from_slice(&raw).unwrap_or_default();
                let decode = |field: &str| {
                    login[field]
                        .as_str()
                        .and_then(|s| STANDARD.decode(s).ok())
                        .and_then(|b| String::from_utf8(b).ok())
                        .unwrap_or_default()
                };
                if login["iam_http_request_method"] != "POST" {
                    return refuse("iam_http_request_method must be POST".into());
                }
                let body = decode("iam_request_body");
                if body != "Action=GetCallerIdentity&Version=2011-06-15" {
                    return refuse(format!("invalid request body {body:?}"));
                }
                let url = decode("iam_request_url");
                let Ok(parsed) = url::Url::parse(&url) else {
                    return refuse(format!("invalid iam_request_url {url:?}"));
                };
                let headers: Value = serde_json::from_str(&decode("iam_request_headers")).unwrap_or_default();
                let header = |name: &str| {
                    headers
                        .as_object()
                        .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
                        .and_then(|(_, v)| v[0].as_str())
                        .map(String::from)
                };
                let authorization = header("authorization").unwrap_or_default();
                let signed: Vec<&str> = authorization
                    .split("SignedHeaders=")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .map(|s| s.split(';').collect())
                    .unwrap_or_default();
                if header("x-vault-aws-iam-server-id").as_deref() != Some(SERVER_ID)
                    || !signed.contains(&"x-vault-aws-iam-server-id")
                {
                    return refuse("missing or invalid signed X-Vault-AWS-IAM-Server-ID header".into());
                }
                // The signature over the headers, URL and body as sent (the keys are moto's `test`).
                let Some(date) = header("x-amz-date") else {
                    return refuse("no X-Amz-Date".into());
                };
                let time = chrono::NaiveDateTime::parse_from_str(&date, "%Y%m%dT%H%M%SZ")
                    .unwrap()
                    .and_utc();
                let time = UNIX_EPOCH + std::time::Duration::from_secs(time.timestamp() as u64);
                let region = authorization.split('/').nth(2).unwrap_or_default().to_string();
                let identity = aws_credential_types::Credentials::new("test", "test", None, None, "fake").into();
                let params = aws_sigv4::sign::v4::SigningParams::builder()
                    .identity(&identity)
                    .region(&region)
                    .name("sts")
                    .time(time)
                    .settings(aws_sigv4::http_request::SigningSettings::default())
                    .build()
                    .unwrap()
                    .into();
                let values: Vec<(String, String)> = signed
                    .iter()
                    .filter(|h| !matches!(**h, "x-amz-date" | "x-amz-security-token"))
                    .map(|h| (h.to_string(), header(h).unwrap_or_default()))
                    .collect();
                let request = aws_sigv4::http_request::SignableRequest::new(
                    "POST",
                    url.as_str(),
                    values.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    aws_sigv4::http_request::SignableBody::Bytes(body.as_bytes()),
                )
                .unwrap();
                let (expected, _) = aws_sigv4::http_request::sign(request, &params).unwrap().into_parts();
                let expected = expected
                    .headers()
                    .find(|(k, _)| *k == "authorization")
                    .map(|(_, v)| v.to_string());
                if expected.as_deref() != Some(authorization.as_str()) {
                    return refuse(format!(
                        "signature mismatch for {}",
                        parsed.host_str().unwrap_or_default()
                    ));
                }
                // As Vault: the request goes to the configured STS endpoint, not the URL's host.
                let mut forward = http.post(format!("{sts}/")).body(body);
                for (name, values) in headers.as_object().unwrap() {
                    if !name.eq_ignore_ascii_case("host") {
                        forward = forward.header(name.as_str(), values[0].as_str().unwrap_or_default());
                    }
                }
                let answer = forward.send().await.unwrap().text().await.unwrap();
                let Some(arn) = answer.split("<Arn>").nth(1).and_then(|s| s.split("</Arn>").next()) else {
                    return refuse(format!("STS did not name the caller: {answer}"));
                };
                let role = login["role"].as_str().unwrap_or_default();
                if !roles.iter().any(|(r, bound)| *r == role && *bound == arn) {
                    return refuse(format!("IAM Principal {arn:?} does not belong to the role {role:?}"));
                }
                Json(json!({"request_id": "fake", "lease_id": "", "renewable": false, "lease_duration": 0,
                    "data": null, "wrap_info": null, "warnings": null, "auth": {"client_token": token, "accessor": "", "policies": ["reader"],
                    "token_policies": ["reader"], "metadata": null, "lease_duration": 0, "renewable": false,
                    "entity_id": "", "token_type": "service", "orphan": true}}))
                .into_response()
            }
        }
    };
    let proxy = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let (http, bao) = (http.clone(), bao.clone());
        async move {
            let mut request = http.request(method, format!("{bao}{uri}")).body(body);
            for name in ["x-vault-token", "x-vault-namespace", "content-type"] {
                if let Some(v) = headers.get(name) {
                    request = request.header(name, v);
                }
            }
            let answer = request.send().await.unwrap();
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
            (status, answer.bytes().await.unwrap()).into_response()
        }
    };
    let app = axum::Router::new()
        .route("/v1/auth/aws/login", axum::routing::post(login))
        .fallback(proxy);
    format!("http://{}", super::support::serve_http(app).await)
}

/// AWS IAM auth: the signed GetCallerIdentity goes (through the fake Vault login above) to moto's
/// STS, which names the caller; the role is bound to that ARN; the token reads from OpenBao. The
/// AWS credentials come from the SDK's default chain, which reads the process environment, so the
/// logins run in a child process.
#[cfg(feature = "vault-aws-auth")]
#[cfg_attr(
    not(all(apono_test_moto, apono_test_bao)),
    ignore = "needs moto and OpenBao: run tests/run, or set APONO_TEST_MOTO_SERVER and APONO_TEST_BAO"
)]
#[tokio::test]
async fn aws_iam_auth_through_moto_sts() {
    let moto = super::support::start_moto().await;
    let (_guard, bao) = bao_with_secret(false, "via-aws-iam").await;
    let vault = vault_aws_login_fake(
        bao.base.clone(),
        moto.url("http"),
        bao.reader_token().await,
        vec![
            ("apono", MOTO_CALLER),
            ("someone-else", "arn:aws:iam::123456789012:role/other"),
        ],
    )
    .await;
    let cases = json!([
        {"definition": {"address": vault, "auth": "aws", "role": "apono", "header_value": "vault.apono.test"},
         "value": "via-aws-iam"},
        {"definition": {"address": vault, "auth": "aws", "role": "apono", "header_value": "vault.apono.test",
                        "region": "eu-west-1"},
         "value": "via-aws-iam"},
        {"definition": {"address": vault, "auth": "aws", "role": "someone-else", "header_value": "vault.apono.test"},
         "refused": "role \"someone-else\""},
        {"definition": {"address": vault, "auth": "aws", "role": "apono"},
         "refused": "X-Vault-AWS-IAM-Server-ID"},
    ]);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = super::support::aws_child("secrets::tests::vault_auth::aws_iam_child");
    cmd.env("APONO_TEST_CASES", cases.to_string())
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", dir.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"));
    let out = cmd.output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{stderr}"
    );
}

#[cfg(feature = "vault-aws-auth")]
#[tokio::test]
#[ignore = "run by aws_iam_auth_through_moto_sts in a child process"]
async fn aws_iam_child() {
    if std::env::var_os("APONO_TEST_CHILD").is_none() {
        return;
    }
    let cases: Value = serde_json::from_str(&std::env::var("APONO_TEST_CASES").unwrap()).unwrap();
    for case in cases.as_array().unwrap() {
        let store = vault(json!([case["definition"]]));
        match (case["value"].as_str(), case["refused"].as_str()) {
            (Some(value), _) => assert_eq!(read(&store).await.unwrap(), value, "{case}"),
            (None, Some(words)) => {
                let e = read(&store).await.unwrap_err();
                assert_eq!(e.code(), "secret_not_permitted", "{case}: {e}");
                assert!(e.to_string().contains(words) && !e.retryable(), "{case}: {e}");
            }
            _ => panic!("bad case {case}"),
        }
    }
}

/// OpenBao in dev mode with a second listener that requires a client certificate signed by
/// `client_ca` (what a listener with `tls_require_and_verify_client_cert`, or an mTLS proxy in
/// front of Vault, does). Killed by its own PID when dropped.
struct MtlsBao {
    child: std::process::Child,
    /// Plain HTTP, for setting up.
    dev: Bao,
    /// `https://127.0.0.1:PORT` of the listener that requires the client certificate.
    mtls: String,
    /// Its server certificate (self-signed), base64 for `ca_cert_base64`.
    server_ca_base64: String,
    _dir: tempfile::TempDir,
}

impl Drop for MtlsBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_mtls_bao(client_ca: &str) -> MtlsBao {
    let dir = tempfile::tempdir().unwrap();
    let (server_cert, server_key) = super::support::self_signed(&["127.0.0.1"]);
    for (name, pem) in [
        ("server.pem", &server_cert),
        ("server.key", &server_key),
        ("client-ca.pem", &client_ca.to_string()),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let mut last_log = String::new();
    for _ in 0..3 {
        let (dev_port, mtls_port) = (super::support::free_port(true), super::support::free_port(false));
        let config = dir.path().join("mtls.hcl");
        std::fs::write(
            &config,
            format!(
                "listener \"tcp\" {{\n  address = \"127.0.0.1:{mtls_port}\"\n  tls_cert_file = \"{0}/server.pem\"\n  tls_key_file = \"{0}/server.key\"\n  tls_client_ca_file = \"{0}/client-ca.pem\"\n  tls_require_and_verify_client_cert = true\n}}\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let log = dir.path().join("server.log");
        let mut child = std::process::Command::new(super::support::bao_bin())
            .args([
                "server".to_string(),
                "-dev".into(),
                format!("-dev-root-token-id={BAO_ROOT}"),
                format!("-dev-listen-address=127.0.0.1:{dev_port}"),
                format!("-config={}", config.display()),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let health = format!("http://127.0.0.1:{dev_port}/v1/sys/health");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if reqwest::get(&health).await.is_ok_and(|r| r.status().is_success()) {
                return MtlsBao {
                    child,
                    dev: Bao::new_at(format!("http://127.0.0.1:{dev_port}")),
                    mtls: format!("https://127.0.0.1:{mtls_port}"),
                    server_ca_base64: STANDARD.encode(&server_cert),
                    _dir: dir,
                };
            }
            if child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                last_log = std::fs::read_to_string(&log).unwrap_or_default();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    panic!("bao with an mTLS listener did not start:\n{last_log}");
}

#[cfg_attr(not(apono_test_bao), ignore = "needs OpenBao: run tests/run, or set APONO_TEST_BAO")]
#[tokio::test]
async fn token_auth_through_a_listener_that_requires_a_client_certificate() {
    let (ca, cert, key) = client_certificate("apono-connector");
    let bao = start_mtls_bao(&ca).await;
    bao.dev
        .post("secret/data/apono/rancher", json!({"data": {"token": "over-mtls"}}))
        .await;
    let with_cert = vault(
        json!([{"address": bao.mtls, "ca_cert_base64": bao.server_ca_base64, "token": BAO_ROOT,
                                  "client_cert_base64": STANDARD.encode(&cert), "client_key_base64": STANDARD.encode(&key)}]),
    );
    assert_eq!(read(&with_cert).await.unwrap(), "over-mtls");
    // Without it the listener ends the handshake: the certificate above is what let the read in.
    let without = vault(json!([{"address": bao.mtls, "ca_cert_base64": bao.server_ca_base64, "token": BAO_ROOT}]));
    let e = read(&without).await.unwrap_err();
    assert_eq!(e.code(), "secret_store_unreachable", "{e}");
}
