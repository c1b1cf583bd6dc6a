//! The binding collections with indexes on the fields a binding never changes after it is
//! created (its resource and its role), so a filtered listing of the large dataset (50,000
//! bindings) looks up its candidates instead of scanning them all, and the benchmark measures
//! the agent, not the simulator.
//!
//! Reads go through `Deref` to the map; every write goes through a method here, which keeps the
//! indexes in step (there is no `DerefMut`, so a write that bypassed them would not compile).
//! `get_mut` and `values_mut` must not change `resource_id` or `role_id` (nothing does: Rancher
//! refuses to change them, and the simulator only fills in status, subject and metadata).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Deref;

use super::store::Binding;

#[derive(Debug, Default)]
pub(crate) struct BindingMap {
    items: BTreeMap<String, Binding>,
    by_resource: HashMap<String, BTreeSet<String>>,
    by_role: HashMap<String, BTreeSet<String>>,
}

impl Deref for BindingMap {
    type Target = BTreeMap<String, Binding>;
    fn deref(&self) -> &Self::Target {
        &self.items
    }
}

impl BindingMap {
    pub fn insert(&mut self, id: String, binding: Binding) -> Option<Binding> {
        let keys = (binding.resource_id.clone(), binding.role_id.clone());
        let old = self.items.insert(id.clone(), binding);
        if let Some(old) = &old {
            self.unindex(&id, old);
        }
        self.by_resource.entry(keys.0).or_default().insert(id.clone());
        self.by_role.entry(keys.1).or_default().insert(id);
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<Binding> {
        let old = self.items.remove(id)?;
        self.unindex(id, &old);
        Some(old)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Binding> {
        self.items.get_mut(id)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Binding> {
        self.items.values_mut()
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut Binding) -> bool) {
        let mut gone = Vec::new();
        self.items.retain(|id, b| {
            let kept = keep(id, b);
            if !kept {
                gone.push((id.clone(), b.resource_id.clone(), b.role_id.clone()));
            }
            kept
        });
        for (id, resource, role) in gone {
            remove_from(&mut self.by_resource, &resource, &id);
            remove_from(&mut self.by_role, &role, &id);
        }
    }

    /// The bindings with this resource and this role (either may be unknown), in id order as the
    /// map lists them: the smaller of the two index entries. `None` when neither is given (scan).
    pub fn candidates(&self, resource: Option<&str>, role: Option<&str>) -> Option<impl Iterator<Item = &Binding>> {
        let set = match (
            resource.map(|k| self.by_resource.get(k)),
            role.map(|k| self.by_role.get(k)),
        ) {
            (None, None) => return None,
            (Some(a), None) | (None, Some(a)) => a,
            (Some(a), Some(b)) => match (a, b) {
                (Some(a), Some(b)) => Some(if a.len() <= b.len() { a } else { b }),
                _ => None,
            },
        };
        // No entry: nothing has that resource or role.
        Some(set.into_iter().flatten().filter_map(|id| self.items.get(id)))
    }

    fn unindex(&mut self, id: &str, old: &Binding) {
        remove_from(&mut self.by_resource, &old.resource_id, id);
        remove_from(&mut self.by_role, &old.role_id, id);
    }
}

fn remove_from(index: &mut HashMap<String, BTreeSet<String>>, key: &str, id: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(id);
        if set.is_empty() {
            index.remove(key);
        }
    }
}
