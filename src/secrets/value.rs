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
use secrecy::zeroize::{Zeroize, Zeroizing};
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

/// The byte-order mark Notepad and some editors put at the start of a UTF-8 file.
const BOM: char = '\u{feff}';

/// `text` without a leading byte-order mark (secrets review N23), in place.
pub(crate) fn strip_bom(text: &mut String) {
    if text.starts_with(BOM) {
        text.replace_range(..BOM.len_utf8(), "");
    }
}

/// The first typographic quote in `text` (what a word processor or a chat tool makes of `"`),
/// with its 1-based line and column: JSON needs straight quotes, and serde's "column 3" alone
/// does not say why. Only the quote character is named, never the text around it.
pub(crate) fn typographic_quote(text: &str) -> Option<(char, usize, usize)> {
    let (mut line, mut column) = (1, 0);
    for c in text.chars() {
        column += 1;
        if matches!(
            c,
            '\u{201c}' | '\u{201d}' | '\u{2018}' | '\u{2019}' | '\u{201e}' | '\u{00ab}' | '\u{00bb}'
        ) {
            return Some((c, line, column));
        }
        if c == '\n' {
            line += 1;
            column = 0;
        }
    }
    None
}

/// What to say about a typographic quote in JSON text, if there is one.
pub(crate) fn typographic_quote_hint(text: &str) -> String {
    match typographic_quote(text) {
        Some((c, line, column)) => format!(
            "; it contains a typographic quote {c} (U+{:04X}) at line {line}, column {column}: JSON needs straight quotes \"",
            c as u32
        ),
        None => String::new(),
    }
}

/// A secret stored as text. The text is zeroed when dropped: once parsed, only the values'
/// `SecretString`s hold it.
pub(crate) fn from_text(reference: &SecretRef, text: String) -> Result<Secret, SecretError> {
    let mut text = Zeroizing::new(text);
    strip_bom(&mut text);
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        match serde_json::from_str::<serde_json::Map<String, Value>>(&text) {
            Ok(map) => return from_json_map(reference, map),
            // Looks like a JSON object but is not one: say so rather than guess.
            Err(e) => {
                return Err(malformed(
                    reference,
                    format!(
                        "the value starts like a JSON object but does not parse (line {}, column {}){}; store a JSON object of strings, or plain text",
                        e.line(),
                        e.column(),
                        typographic_quote_hint(&text)
                    ),
                ));
            }
        }
    }
    let mut map = BTreeMap::new();
    if is_key_pair(&text) {
        map.insert(TOKEN_KEY.to_string(), SecretString::from(text.trim()));
    }
    map.insert(PLAIN_VALUE_KEY.to_string(), SecretString::from(text.as_str()));
    Ok(Secret::new(map))
}

/// `s` as a `SecretString`, the original zeroed. `SecretString::from(String)` shrinks the string
/// to fit, which can move it and free the old buffer as it was: a copy of exactly its length
/// is made instead.
pub(crate) fn secret_string(mut s: String) -> SecretString {
    let secret = SecretString::from(s.as_str());
    s.zeroize();
    secret
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
        Err(e) => {
            e.into_bytes().zeroize();
            Err(malformed(
                reference,
                "the value is binary, not UTF-8 text; store a JSON object of strings".into(),
            ))
        }
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
            Value::String(s) => secret_string(s),
            Value::Number(n) => secret_string(n.to_string()),
            Value::Bool(b) => secret_string(b.to_string()),
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
        out.insert(key, text);
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
                out.insert(key, secret_string(s));
            }
            Err(e) => {
                e.into_bytes().zeroize();
                return Err(malformed(
                    reference,
                    format!("key {key:?} holds binary data, not UTF-8 text"),
                ));
            }
        }
    }
    Ok(Secret::new(out))
}
