//! Which namespace holds a project's role bindings: `p-y` for projects created before Rancher
//! 2.12, `c-x-p-y` after. A PRTB's id is `<namespace>:<name>`, so with the namespace known a
//! repeated project grant (the POST answers 409 AlreadyExists) can name its binding without a
//! lookup: 2 requests instead of 3.
//!
//! Learned from every PRTB this process sees (created, listed, discovered), per Rancher server,
//! and kept for the life of the process (integrations are built per job, so this is process-wide).
//! Never guessed: an unknown project costs the one lookup.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Bound on remembered projects; past it the memory starts over (a lookup is only one request).
const MAX_ENTRIES: usize = 100_000;

fn memory() -> &'static Mutex<HashMap<String, String>> {
    static MEMORY: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    MEMORY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn key(server: &str, project_id: &str) -> String {
    format!("{server}|{project_id}")
}

/// Remembers the namespace of `project_id` from one of its bindings' ids.
pub fn learn(server: &str, project_id: &str, binding_id: &str) {
    let Some((namespace, _)) = binding_id.split_once(':') else {
        return;
    };
    if namespace.is_empty() || project_id.is_empty() {
        return;
    }
    if let Ok(mut m) = memory().lock() {
        if m.len() >= MAX_ENTRIES {
            m.clear();
        }
        m.insert(key(server, project_id), namespace.to_string());
    }
}

/// The namespace holding `project_id`'s bindings, if this process has seen one.
pub fn namespace_of(server: &str, project_id: &str) -> Option<String> {
    memory().lock().ok()?.get(&key(server, project_id)).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_both_id_forms_per_server() {
        learn("https://a", "c-1:p-old", "p-old:prtb-x");
        learn("https://a", "c-1:p-new", "c-1-p-new:prtb-y");
        assert_eq!(namespace_of("https://a", "c-1:p-old").as_deref(), Some("p-old"));
        assert_eq!(namespace_of("https://a", "c-1:p-new").as_deref(), Some("c-1-p-new"));
        assert_eq!(
            namespace_of("https://b", "c-1:p-old"),
            None,
            "another server knows nothing"
        );
        learn("https://a", "c-1:p-bad", "no-namespace");
        assert_eq!(
            namespace_of("https://a", "c-1:p-bad"),
            None,
            "an id without a namespace teaches nothing"
        );
    }
}
