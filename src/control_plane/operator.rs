//! Operator API of the embedded control plane (`/operator/v1`), used by `apono-connector access`.
//! Types here are shared by the server and the CLI's client.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::protocol::JobError;
use crate::integrations::{BoundSubject, Credentials, IntegrationSpec, Resource, Subject};

pub const OPERATOR_PREFIX: &str = "/operator/v1";

/// Longest subject, role, integration name or id the operator API takes, in characters.
pub const MAX_FIELD_CHARS: usize = 256;

/// Most items in one page of `GET /operator/v1/access-requests` or `/jobs` (`?limit=`).
pub const MAX_PAGE: usize = 1000;

/// Response header of a list page that is not the last: the value to pass as `?after=`.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

/// Bidirectional-formatting characters: they reorder what a terminal or a log viewer shows.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Checks a name or id an operator sent: at most [`MAX_FIELD_CHARS`] characters, no control or
/// bidirectional-formatting character (a newline in a username forged log lines; an 8 MiB one
/// broke `access list`: security review N10).
///
/// # Errors
/// What is wrong, naming `field`, for a 400.
pub fn check_field(field: &str, value: &str) -> Result<(), String> {
    let chars = value.chars().count();
    if chars > MAX_FIELD_CHARS {
        return Err(format!(
            "{field} is {chars} characters long; at most {MAX_FIELD_CHARS} are allowed"
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() || is_bidi_control(*c)) {
        return Err(format!(
            "{field} contains the control character U+{:04X}; names and ids cannot hold control or \
             bidirectional-formatting characters",
            u32::from(c)
        ));
    }
    Ok(())
}

/// `text` with control and bidirectional-formatting characters escaped (`\n`, `\u{1b}`), for a
/// terminal: a Rancher error or an old row cannot move the cursor, clear the screen or retitle
/// the window of whoever runs `access list`.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// One page of a list: at most `limit` items whose id sorts after `after`, and the cursor of
/// the next page when there are more. `items` must be in id order (the operator API sorts its
/// lists so), so that a walk sees every item once, and "after this id" stays right when the
/// cursor's row is pruned in between.
pub fn page<T>(items: Vec<T>, id: impl Fn(&T) -> &str, limit: usize, after: Option<&str>) -> (Vec<T>, Option<String>) {
    debug_assert!(
        items.is_sorted_by(|a, b| id(a) <= id(b)),
        "a paged list must be in id order"
    );
    let mut rest = items
        .into_iter()
        .filter(|item| after.is_none_or(|after| id(item) > after))
        .peekable();
    let mut out = Vec::new();
    while out.len() < limit {
        match rest.next() {
            Some(item) => out.push(item),
            None => break,
        }
    }
    let next = match (rest.peek(), out.last()) {
        (Some(_), Some(last)) => Some(id(last).to_string()),
        _ => None,
    };
    (out, next)
}

/// An integration named in the control plane's config, or given inline (which registers it under
/// its `name`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntegrationRef {
    Name(String),
    Inline(Box<IntegrationSpec>),
}

/// `POST /operator/v1/access-requests`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRequestCreate {
    pub integration: IntegrationRef,
    #[serde(flatten)]
    pub subject: Subject,
    pub role: String,
    pub resource: Resource,
    pub ttl_seconds: u64,
    #[serde(default)]
    pub create_user: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessState {
    /// The grant job is queued or running.
    Pending,
    /// Granted; a revoke is queued at `expires_at` (unless another access on the same binding
    /// still holds it, then the binding is handed over to it).
    Active,
    /// The revoke job is queued or running (retried until it succeeds). Also the cleanup after a
    /// grant that failed for good or was cancelled after it started.
    Revoking,
    /// Ended. `last_error` keeps the grant's error when the grant failed and was cleaned up.
    Revoked,
    /// Written by older builds only: a grant that failed for good, with no cleanup. `access
    /// revoke` on it queues the cleanup revoke.
    Failed,
}

impl AccessState {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessState::Pending => "pending",
            AccessState::Active => "active",
            AccessState::Revoking => "revoking",
            AccessState::Revoked => "revoked",
            AccessState::Failed => "failed",
        }
    }
}

/// An access request as the operator API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: String,
    pub integration: String,
    #[serde(flatten)]
    pub subject: Subject,
    pub role: String,
    pub resource: Resource,
    pub ttl_seconds: u64,
    pub create_user: bool,
    pub state: AccessState,
    pub created_at: DateTime<Utc>,
    pub granted_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub grant_job_id: String,
    pub revoke_job_id: Option<String>,
    pub user_id: Option<String>,
    #[serde(default)]
    pub binding_ids: Vec<String>,
    pub access_details: Option<String>,
    /// The grant found equal access already there, made by someone else: the revoke leaves it.
    #[serde(default)]
    pub pre_existing: bool,
    /// The Rancher subject the binding is bound by, as the grant resolved it (`userId`,
    /// `userPrincipalId` or `groupPrincipalId`): what overlapping accesses share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_subject: Option<BoundSubject>,
    /// For the requester: e.g. why a `create_user` grant returned no password (the user already
    /// holds a live access whose password stays valid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// The latest failure of this request's grant or revoke, if any.
    pub last_error: Option<JobError>,
    /// Credentials generated by the grant: present in the first read after the grant only, never
    /// stored by the control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
}

/// `POST /operator/v1/jobs`: queue a raw job. The control plane checks nothing but the kind's
/// presence; the agent validates the rest, as it must for any control plane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobCreate {
    pub kind: String,
    /// An integration name, or an inline integration object (stored as given).
    pub integration: Value,
    #[serde(default)]
    pub params: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Leased,
    Succeeded,
    Failed,
}

/// A job as the operator API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: String,
    pub integration: String,
    pub state: JobState,
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub result: Option<Value>,
    pub error: Option<JobError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_bounded_and_free_of_control_characters() {
        assert!(check_field("user", "alice").is_ok());
        assert!(check_field("user", "github_user://123").is_ok());
        assert!(check_field("user", &"a".repeat(MAX_FIELD_CHARS)).is_ok());
        assert!(
            check_field("user", &"a".repeat(MAX_FIELD_CHARS + 1))
                .unwrap_err()
                .contains("at most 256")
        );
        for bad in ["eve\nINFO forged", "a\rb", "\u{1b}[2J", "x\u{202E}y", "nul\0"] {
            let e = check_field("user", bad).unwrap_err();
            assert!(e.contains("user contains the control character"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn printable_escapes_what_a_terminal_would_obey() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2J\nb"), "a\\u{1b}[2J\\nb");
        assert!(!printable("x\u{202E}y").contains('\u{202E}'));
    }

    #[test]
    fn pages_walk_every_item_once() {
        let items: Vec<String> = (0..7).map(|n| format!("id-{n:02}")).collect();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = page(items.clone(), |s| s.as_str(), 3, after.as_deref());
            assert!(page.len() <= 3);
            seen.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, items);
        // A cursor whose row was pruned still lands after it.
        let (rest, _) = page(items, |s| s.as_str(), 10, Some("id-03x"));
        assert_eq!(rest.first().map(String::as_str), Some("id-04"));
    }
}
