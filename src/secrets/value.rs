//! Turning what a store holds into a [`Secret`]: a map of string keys to string values.
//!
//! - a JSON object: its fields (strings; numbers and booleans as their JSON text);
//! - any other text: one key, `value`; and when the text is one `access_key:secret_key` pair (how
//!   one Rancher API key is naturally stored as plain text), also `token`, the key Rancher reads;
//! - a key/value map from the store (Kubernetes data, a Vault KV entry): as is.
//!
//! Nested, null or binary values are refused with an error that names the key, never the value.
//! serde_json's own errors are not passed on: they quote the input.

// Each store uses some of these; a build with only some stores leaves the others unused.
#![cfg_attr(
    not(all(
        feature = "store-kubernetes",
        feature = "store-aws",
        feature = "store-azure",
        feature = "store-gcp",
        feature = "store-vault"
    )),
    allow(dead_code)
)]

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde_json::Value;

use super::{Secret, SecretError, SecretRef};

/// The key a plain (non-JSON-object) value is stored under.
pub const PLAIN_VALUE_KEY: &str = "value";

fn malformed(reference: &SecretRef, hint: String) -> SecretError {
    SecretError::Malformed {
        reference: reference.describe(),
        hint,
    }
}

/// A secret stored as text.
pub(crate) fn from_text(reference: &SecretRef, text: String) -> Result<Secret, SecretError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        match serde_json::from_str::<serde_json::Map<String, Value>>(&text) {
            Ok(map) => return from_json_map(reference, map),
            // Looks like a JSON object but is not one: say so rather than guess.
            Err(e) => {
                return Err(malformed(
                    reference,
                    format!(
                        "the value starts like a JSON object but does not parse (line {}, column {}); store a JSON object of strings, or plain text",
                        e.line(),
                        e.column()
                    ),
                ));
            }
        }
    }
    let mut map = BTreeMap::new();
    if is_key_pair(&text) {
        map.insert(TOKEN_KEY.to_string(), SecretString::from(text.trim().to_string()));
    }
    map.insert(PLAIN_VALUE_KEY.to_string(), SecretString::from(text));
    Ok(Secret::new(map))
}

/// The key a plain `access_key:secret_key` value is also stored under.
pub const TOKEN_KEY: &str = "token";

/// One `name:secret` pair: a single colon, both sides non-empty, no whitespace inside.
fn is_key_pair(text: &str) -> bool {
    let text = text.trim();
    matches!(text.split_once(':'), Some((a, k)) if !a.is_empty() && !k.is_empty() && !k.contains(':'))
        && !text.chars().any(char::is_whitespace)
}

/// A secret stored as bytes (must be UTF-8 text).
pub(crate) fn from_bytes(reference: &SecretRef, bytes: Vec<u8>) -> Result<Secret, SecretError> {
    match String::from_utf8(bytes) {
        Ok(text) => from_text(reference, text),
        Err(_) => Err(malformed(
            reference,
            "the value is binary, not UTF-8 text; store a JSON object of strings".into(),
        )),
    }
}

/// A JSON object's fields.
pub(crate) fn from_json_map(
    reference: &SecretRef,
    map: impl IntoIterator<Item = (String, Value)>,
) -> Result<Secret, SecretError> {
    let mut out = BTreeMap::new();
    for (key, value) in map {
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => {
                return Err(malformed(
                    reference,
                    format!("key {key:?} is null; every value must be a string"),
                ));
            }
            Value::Array(_) | Value::Object(_) => {
                return Err(malformed(
                    reference,
                    format!("key {key:?} holds a nested value; every value must be a string"),
                ));
            }
        };
        out.insert(key, SecretString::from(text));
    }
    Ok(Secret::new(out))
}

/// A map of keys to bytes (a Kubernetes Secret's `data`, already base64-decoded).
pub(crate) fn from_bytes_map(
    reference: &SecretRef,
    map: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> Result<Secret, SecretError> {
    let mut out = BTreeMap::new();
    for (key, bytes) in map {
        match String::from_utf8(bytes) {
            Ok(s) => {
                out.insert(key, SecretString::from(s));
            }
            Err(_) => {
                return Err(malformed(
                    reference,
                    format!("key {key:?} holds binary data, not UTF-8 text"),
                ));
            }
        }
    }
    Ok(Secret::new(out))
}
