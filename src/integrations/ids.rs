//! Checks for the ids that go into Rancher URL paths (cluster, project, user and binding ids).
//!
//! Rancher ids are Kubernetes object names (lowercase letters, digits, `-`, `.`), optionally
//! prefixed by a namespace and `:` (`c-x:p-y`, `c-x:crtb-y`, `p-y:prtb-z`). Anything else cannot
//! name a Rancher object, and some of it would change the request: `url` drops a `.` or `..`
//! segment and resolves `%2e%2e`, so `GET /v3/users/..` becomes `GET /v3/users`. Ids are checked
//! where they enter (job params, the CLI), before any request is made.

/// Longest id accepted: a Kubernetes name is at most 253 characters; a namespaced id is two.
const MAX_ID_LEN: usize = 2 * 253 + 1;

/// Checks one name (no `:`): non-empty, lowercase letters, digits, `-` and `.`, not `.` or `..`.
fn check_name(field: &str, whole: &str, name: &str) -> Result<(), String> {
    let shown = shown(whole);
    if name.is_empty() {
        return Err(format!("{field} {shown} is not a Rancher id: it has an empty part"));
    }
    if name == "." || name == ".." {
        return Err(format!(
            "{field} {shown} is not a Rancher id: \".\" and \"..\" cannot be ids"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.')))
    {
        return Err(format!(
            "{field} {shown} is not a Rancher id: {c:?} is not allowed (ids use lowercase letters, digits, \
             '-' and '.')"
        ));
    }
    Ok(())
}

/// The value as it may appear in a message: quoted, escaped, and cut short.
fn shown(value: &str) -> String {
    const MAX_SHOWN: usize = 80;
    if value.chars().count() > MAX_SHOWN {
        format!("{:?}...", value.chars().take(MAX_SHOWN).collect::<String>())
    } else {
        format!("{value:?}")
    }
}

fn check_len(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "{field} {} is not a Rancher id: it is longer than {MAX_ID_LEN} characters",
            shown(value)
        ));
    }
    Ok(())
}

/// A plain id without a namespace: a cluster id (`c-xxxxx`, `local`), a user id (`u-xxxxx`,
/// `user-xxxxx`), a global role binding id (`grb-xxxxx`).
///
/// # Errors
/// A message naming `field` and what is wrong.
pub fn check_plain(field: &str, value: &str) -> Result<(), String> {
    check_len(field, value)?;
    if value.contains(':') {
        return Err(format!(
            "{field} {} is not a Rancher id: it must not contain ':'",
            shown(value)
        ));
    }
    check_name(field, value, value)
}

/// A namespaced id `ns:name`: a project id (`c-x:p-y`).
///
/// # Errors
/// A message naming `field` and what is wrong.
pub fn check_namespaced(field: &str, value: &str) -> Result<(), String> {
    check_len(field, value)?;
    match value.split_once(':') {
        Some((ns, name)) if !name.contains(':') => {
            check_name(field, value, ns)?;
            check_name(field, value, name)
        }
        _ => Err(format!(
            "{field} {} is not a Rancher id of the form namespace:name",
            shown(value)
        )),
    }
}

/// A binding id: `c-x:crtb-y`, `p-y:prtb-z` (namespaced) or `grb-x` (plain).
///
/// # Errors
/// A message naming `field` and what is wrong.
pub fn check_binding(field: &str, value: &str) -> Result<(), String> {
    if value.contains(':') {
        check_namespaced(field, value)
    } else {
        check_plain(field, value)
    }
}

/// A segment of a Rancher URL path, the last line of defence behind the checks above: any
/// segment that is empty, `.`, `..`, or has a character outside `[A-Za-z0-9._:-]` is refused
/// (the constant segments, like `ext.cattle.io.tokens` or `server-version`, pass).
///
/// # Errors
/// A message naming the segment.
pub fn check_segment(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value.len() <= MAX_ID_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} cannot be part of a Rancher URL path (ids use lowercase letters, digits, '-', '.' and ':')",
            shown(value)
        ))
    }
}

/// Deserializes a `String` checked by `check`; the field's name is `field`.
pub(crate) fn de_checked<'de, D>(
    d: D,
    field: &str,
    check: fn(&str, &str) -> Result<(), String>,
) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = <String as serde::Deserialize>::deserialize(d)?;
    let s = s.trim().to_string();
    check(field, &s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

/// serde `deserialize_with` for a user id.
pub(crate) fn de_user_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    de_checked(d, "user_id", check_plain)
}

/// serde `deserialize_with` for an optional user id.
pub(crate) fn de_opt_user_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = <Option<String> as serde::Deserialize>::deserialize(d)?;
    match v {
        None => Ok(None),
        Some(s) => {
            let s = s.trim().to_string();
            // Empty (a group's grant), or a principal that builds before `bound_subject` recorded
            // as the user (a group's, or an external user's whose user did not exist yet): no
            // user id, so the revoke finds the subject itself. Refusing it left the revoke
            // `malformed_job` forever (lifecycle review D1).
            if s.is_empty() || s.contains("://") {
                return Ok(None);
            }
            check_plain("user_id", &s).map_err(serde::de::Error::custom)?;
            Ok(Some(s))
        }
    }
}

/// serde `deserialize_with` for a list of binding ids named `field`.
fn de_binding_ids<'de, D: serde::Deserializer<'de>>(d: D, field: &str) -> Result<Vec<String>, D::Error> {
    let ids = <Vec<String> as serde::Deserialize>::deserialize(d)?;
    ids.into_iter()
        .map(|id| {
            let id = id.trim().to_string();
            check_binding(field, &id).map(|()| id).map_err(serde::de::Error::custom)
        })
        .collect()
}

pub(crate) fn de_revoke_binding_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    de_binding_ids(d, "binding_ids")
}

pub(crate) fn de_keep_binding_ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    de_binding_ids(d, "keep_binding_ids")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rancher_ids_pass() {
        for id in ["local", "c-7x2k9", "c-m-abc12", "u-abc12", "user-x9z", "grb-abc", "a.b"] {
            check_plain("id", id).unwrap();
            check_binding("id", id).unwrap();
        }
        for id in ["c-x:p-y", "c-x:crtb-abc", "p-y:prtb-z"] {
            check_namespaced("id", id).unwrap();
            check_binding("id", id).unwrap();
        }
        for seg in [
            "v3",
            "ext.cattle.io.tokens",
            "server-version",
            "c-x:crtb-y",
            "token-ABC12",
        ] {
            check_segment(seg).unwrap();
        }
    }

    #[test]
    fn hostile_ids_are_refused_naming_the_field() {
        for id in [
            "",
            ".",
            "..",
            "c-x/../../users",
            "c-x?userId=y",
            "local%2F..",
            "c-x#frag",
            "c x",
            "c-x\n",
            "C-X",
            "%2e%2e",
        ] {
            let e = check_plain("cluster_id", id).unwrap_err();
            assert!(e.starts_with("cluster_id "), "{e}");
            assert!(check_binding("binding_ids", id).is_err(), "{id}");
            assert!(check_segment(id).is_err() || id == "C-X", "{id}");
        }
        for id in ["c-x:..", "..:p-y", "c-x:p-y:z", "c-x:", ":p-y", "c-x:p/y"] {
            assert!(check_namespaced("resource", id).is_err(), "{id}");
        }
        assert!(
            check_plain("user_id", &"a".repeat(1000))
                .unwrap_err()
                .contains("longer")
        );
    }
}
