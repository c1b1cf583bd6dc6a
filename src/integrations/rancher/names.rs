//! Pure helpers: deterministic binding names, Rancher's user ids for external principals,
//! generated passwords, and the marker on the users and bindings the agent creates.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngExt;
use rand::distr::Alphanumeric;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use crate::integrations::{BindingScope, Owner};

/// Label set on every user and binding the agent creates. Rotation and deletion touch only
/// users with it. On a binding it is necessary, not sufficient: see `model::Ownership` for what
/// makes a binding this connector's.
pub const CREATED_BY_LABEL: &str = "apono.io/created-by";
pub const CREATED_BY_VALUE: &str = "apono-connector";
/// Annotation on a binding the connector created: the grant (access request) it was made for,
/// so a revoke removes the connector's duplicates of its own grant and no other grant's.
pub const GRANT_ID_ANNOTATION: &str = "apono.io/grant-id";
/// Annotation on a binding the connector created: when the access it carries ends (RFC 3339,
/// UTC). The sweep removes the binding once this has passed, even if the control plane's state
/// is lost. Login bindings of created users carry the label but no expiry: never swept.
pub const EXPIRES_AT_ANNOTATION: &str = "apono.io/expires-at";
/// Annotation on a binding the connector created: which connector (`Owner`: connector id and
/// install id). Hashed into the binding's name too, so a copy under another name, or another
/// connector's binding, never passes for this connector's.
pub const OWNER_ANNOTATION: &str = "apono.io/owner";
/// Description set on users the agent creates (a second marker, visible in the UI).
pub const CREATED_BY_DESCRIPTION: &str = "created by apono-connector";
/// Hex characters of the hash in a binding name: 64 bits, so names of different grants do not
/// collide in practice, and the name stays a short DNS label.
const NAME_HASH_CHARS: usize = 16;
/// Generated password length; Rancher's default minimum is 12.
pub const PASSWORD_LEN: usize = 32;

/// The marker written on a binding the connector creates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marker {
    pub owner: Option<Owner>,
    pub grant_id: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Marker {
    /// The labels of a new binding: only the created-by label.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(CREATED_BY_LABEL.to_string(), CREATED_BY_VALUE.to_string())])
    }

    /// The annotations of a new binding: owner, grant id and expiry, each when known.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        if let Some(o) = &self.owner {
            a.insert(OWNER_ANNOTATION.to_string(), o.to_string());
        }
        if let Some(g) = self.grant_id.as_deref().filter(|g| !g.is_empty()) {
            a.insert(GRANT_ID_ANNOTATION.to_string(), g.to_string());
        }
        if let Some(t) = self.expires_at {
            a.insert(EXPIRES_AT_ANNOTATION.to_string(), format_expiry(t));
        }
        a
    }
}

/// An expiry as written in the annotation: RFC 3339, UTC, whole seconds (`2030-01-02T03:04:05Z`).
pub fn format_expiry(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// An expiry annotation read back; `None` when it is not RFC 3339.
pub fn parse_expiry(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// What a binding's expiry annotation says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkedExpiry {
    /// No annotation (a login binding, or a grant without a TTL): never swept.
    None,
    /// An annotation that is not a time: never swept, worth a warning.
    Unreadable(String),
    At(DateTime<Utc>),
}

/// The field a binding's subject goes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingSubject {
    UserId(String),
    UserPrincipal(String),
    GroupPrincipal(String),
}

impl BindingSubject {
    /// The v3 field name.
    pub fn field(&self) -> &'static str {
        match self {
            BindingSubject::UserId(_) => "userId",
            BindingSubject::UserPrincipal(_) => "userPrincipalId",
            BindingSubject::GroupPrincipal(_) => "groupPrincipalId",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            BindingSubject::UserId(v) | BindingSubject::UserPrincipal(v) | BindingSubject::GroupPrincipal(v) => v,
        }
    }
}

/// `grb-`/`crtb-`/`prtb-` + hex(sha256(owner|scope|subject|role|resource))[..16]: the same grant
/// of the same connector always gets the same name, so a repeated (or retried) POST answers 409
/// AlreadyExists on every Rancher version instead of creating a duplicate; another connector's
/// name for the same access differs, so two connectors never share a binding.
pub fn binding_name(
    owner: &Owner,
    scope: BindingScope,
    subject: &BindingSubject,
    role: &str,
    resource: &str,
) -> String {
    hashed_name(scope, &format!("{owner}|{}", name_key(scope, subject, role, resource)))
}

/// The name builds before the owner existed gave a binding: the same hash without the owner.
/// Such a binding is adopted at upgrade (see `model::Ownership::Legacy`).
pub fn legacy_binding_name(scope: BindingScope, subject: &BindingSubject, role: &str, resource: &str) -> String {
    hashed_name(scope, &name_key(scope, subject, role, resource))
}

fn name_key(scope: BindingScope, subject: &BindingSubject, role: &str, resource: &str) -> String {
    let scope = match scope {
        BindingScope::Global => "global",
        BindingScope::Cluster => "cluster",
        BindingScope::Project => "project",
    };
    format!("{scope}|{}={}|{role}|{resource}", subject.field(), subject.value())
}

fn hashed_name(scope: BindingScope, key: &str) -> String {
    let prefix = match scope {
        BindingScope::Global => "grb-",
        BindingScope::Cluster => "crtb-",
        BindingScope::Project => "prtb-",
    };
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("{prefix}{}", &digest[..NAME_HASH_CHARS])
}

/// The id Rancher gives the user of an external principal: `u-` +
/// lowercase(base32(sha256(principal)))[:10] (`pkg/auth/providers/common/usermanager.go`).
pub fn external_user_id(principal: &str) -> String {
    let digest = Sha256::digest(principal.as_bytes());
    let encoded = base32(&digest);
    format!("u-{}", encoded[..10].to_ascii_lowercase())
}

/// The user id in a `local://u-xxxxx` principal.
pub fn local_user_id(principal: &str) -> Option<&str> {
    principal
        .strip_prefix("local://")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// RFC 4648 base32 (standard alphabet, no padding).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// A random password of letters and digits with at least one of each kind (upper, lower,
/// digit), so common password policies accept it.
pub fn generate_password() -> SecretString {
    let mut rng = rand::rng();
    loop {
        let candidate: String = (&mut rng)
            .sample_iter(Alphanumeric)
            .take(PASSWORD_LEN)
            .map(char::from)
            .collect();
        let has = |f: fn(&char) -> bool| candidate.chars().any(|c| f(&c));
        if has(char::is_ascii_uppercase) && has(char::is_ascii_lowercase) && has(char::is_ascii_digit) {
            return SecretString::from(candidate);
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn binding_names_are_deterministic_dns_labels() {
        let s = BindingSubject::UserId("u-abc".into());
        let me = Owner::new("standalone", "i1").unwrap();
        let binding_name =
            |scope, s: &BindingSubject, role: &str, resource: &str| super::binding_name(&me, scope, s, role, resource);
        let a = binding_name(BindingScope::Cluster, &s, "cluster-member", "c-7x2k9");
        assert_eq!(a, binding_name(BindingScope::Cluster, &s, "cluster-member", "c-7x2k9"));
        // Another connector, and the builds before owners, name the same access differently.
        let other = Owner::new("standalone", "i2").unwrap();
        assert_ne!(
            a,
            super::binding_name(&other, BindingScope::Cluster, &s, "cluster-member", "c-7x2k9")
        );
        let legacy = legacy_binding_name(BindingScope::Cluster, &s, "cluster-member", "c-7x2k9");
        assert_ne!(a, legacy);
        // The old scheme, computed independently: sha256("cluster|userId=u-abc|cluster-member|c-7x2k9").
        assert_eq!(
            legacy,
            format!(
                "crtb-{}",
                &hex::encode(Sha256::digest(b"cluster|userId=u-abc|cluster-member|c-7x2k9"))[..16]
            )
        );
        assert!(a.starts_with("crtb-") && a.len() == 5 + NAME_HASH_CHARS, "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        assert_ne!(a, binding_name(BindingScope::Cluster, &s, "cluster-owner", "c-7x2k9"));
        assert_ne!(a, binding_name(BindingScope::Cluster, &s, "cluster-member", "c-other"));
        let p = BindingSubject::UserPrincipal("u-abc".into());
        assert_ne!(a, binding_name(BindingScope::Cluster, &p, "cluster-member", "c-7x2k9"));
        assert!(binding_name(BindingScope::Global, &s, "admin", "global").starts_with("grb-"));
        assert!(binding_name(BindingScope::Project, &s, "project-member", "c-1:p-2").starts_with("prtb-"));
    }

    #[test]
    fn the_marker_round_trips() {
        let t = DateTime::parse_from_rfc3339("2030-01-02T03:04:05.678+02:00")
            .unwrap()
            .with_timezone(&Utc);
        let m = Marker {
            owner: Some(Owner::new("standalone", "i1").unwrap()),
            grant_id: Some("acc-1".into()),
            expires_at: Some(t),
        };
        assert_eq!(
            m.labels().get(CREATED_BY_LABEL).map(String::as_str),
            Some(CREATED_BY_VALUE)
        );
        let a = m.annotations();
        assert_eq!(a.get(GRANT_ID_ANNOTATION).map(String::as_str), Some("acc-1"));
        assert_eq!(a.get(OWNER_ANNOTATION).map(String::as_str), Some("standalone/i1"));
        assert_eq!(
            a.get(EXPIRES_AT_ANNOTATION).map(String::as_str),
            Some("2030-01-02T01:04:05Z")
        );
        assert_eq!(
            parse_expiry("2030-01-02T01:04:05Z").map(|p| p.timestamp()),
            Some(t.timestamp())
        );
        assert_eq!(parse_expiry("tomorrow"), None);
        assert!(Marker::default().annotations().is_empty());
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fo"), "MZXQ");
        assert_eq!(base32(b"foo"), "MZXW6");
        assert_eq!(base32(b"foob"), "MZXW6YQ");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn external_user_ids_follow_rancher() {
        let id = external_user_id("github_user://123");
        assert!(id.starts_with("u-") && id.len() == 12, "{id}");
        assert!(
            id[2..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
        );
        assert_eq!(id, external_user_id("github_user://123"));
        // sha256 → base32 → lowercase, first 10 (computed independently).
        assert_eq!(external_user_id("github_user://4242"), "u-t3pwg2epgg");
        assert_eq!(external_user_id("github_user://5151"), "u-dpuo33tiay");
        assert_ne!(id, external_user_id("github_user://124"));
    }

    #[test]
    fn local_principals_name_their_user() {
        assert_eq!(local_user_id("local://u-abc12"), Some("u-abc12"));
        assert_eq!(local_user_id("local://"), None);
        assert_eq!(local_user_id("github_user://1"), None);
    }

    #[test]
    fn passwords_are_long_and_mixed() {
        let a = generate_password();
        let b = generate_password();
        let s = a.expose_secret();
        assert_eq!(s.len(), PASSWORD_LEN);
        assert!(s.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(s, b.expose_secret());
    }
}
