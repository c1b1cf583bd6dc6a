//! Discovery: every cluster, project, namespace, role, user and binding, streamed page by page.
//!
//! The eight top-level collections are listed in parallel; once the clusters are known, their
//! namespaces (`GET /v3/cluster/{id}/namespaces`) are listed `concurrency` clusters at a time. The
//! client's semaphore bounds requests in flight overall. Memory stays bounded: each page is
//! streamed into the sink before the next is fetched (only ids are kept, for the loop guard, and
//! the clusters themselves until their namespaces are listed).
//!
//! **One bad cluster does not fail discovery.** A cluster's namespaces are served through its
//! agent's tunnel: a disconnected agent stalls 20-40 s, then Rancher answers 500 "cluster agent
//! disconnected" (rancher `pkg/dialer/factory.go`, norman `httperror/handler/handler.go`). So any
//! failure of that route (5xx, 429, 403, 404, a timeout, a broken connection, a listing that does
//! not converge) skips the cluster, with a short deadline (`cluster_timeout_seconds`) and at most
//! one retry, and is reported in the summary. A 401 is the key's problem, not the cluster's, and
//! still fails discovery, as does any failure of the top-level listings.
//!
//! **Order.** A `cluster` object is emitted after its namespace listing has settled, so it can say
//! whether its namespaces were listed (`namespaces_listed`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::Rancher;
use super::client::PageError;
use super::model::{Binding, Cluster, GlobalRole, HasId, Namespace, Project, RoleTemplate, User, nonempty};
use crate::integrations::{BindingScope, DiscoveredObject, DiscoverySummary, IntegrationError, SkippedCluster};

/// Tries per page of a cluster's namespaces: one retry at most, so a dead cluster gives up fast.
const NAMESPACE_ATTEMPTS: usize = 2;

/// Why discovery stopped early.
enum Stop {
    /// The receiver went away: stop quietly, with `Ok`.
    Closed,
    Failed(IntegrationError),
}

impl From<IntegrationError> for Stop {
    fn from(e: IntegrationError) -> Stop {
        Stop::Failed(e)
    }
}

/// The sink, with counts per type and the clusters whose namespaces were not listed.
struct Emitter<'a> {
    sink: &'a mpsc::Sender<DiscoveredObject>,
    counts: Mutex<BTreeMap<String, u64>>,
    skipped: Mutex<Vec<SkippedCluster>>,
}

impl Emitter<'_> {
    async fn send(&self, object: DiscoveredObject) -> Result<(), Stop> {
        let kind = object.type_name();
        self.sink.send(object).await.map_err(|_| Stop::Closed)?;
        self.count(kind);
        Ok(())
    }

    fn count(&self, kind: &str) {
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry(kind.to_string()).or_default() += 1;
        }
    }

    fn skip(&self, cluster: SkippedCluster) {
        if let Ok(mut skipped) = self.skipped.lock() {
            skipped.push(cluster);
        }
    }
}

impl Rancher {
    pub(super) async fn discover_all(
        &self,
        sink: mpsc::Sender<DiscoveredObject>,
    ) -> Result<DiscoverySummary, IntegrationError> {
        // An admin sees everything; anyone else gets silently partial listings, from which
        // objects would look gone.
        self.ensure_admin().await?;
        let started = Instant::now();
        let requests_before = self.client.requests();
        let emit = Emitter {
            sink: &sink,
            counts: Mutex::new(BTreeMap::new()),
            skipped: Mutex::new(Vec::new()),
        };

        let namespaces_then_clusters = async {
            // Kept until its namespaces are listed: a cluster's line says how that went.
            let mut clusters = Vec::new();
            let mut pager = self.client.list::<Cluster>(&["v3", "clusters"], &[], "clusters");
            while let Some(page) = pager.next_page().await? {
                clusters.extend(page);
            }
            let emit = &emit;
            let mut listings = futures::stream::iter(clusters)
                .map(|c: Cluster| async move {
                    let skipped = self.cluster_namespaces(&c.id, emit).await?;
                    let namespaces_listed = skipped.is_none();
                    if let Some(reason) = skipped {
                        emit.skip(SkippedCluster {
                            id: c.id.clone(),
                            reason,
                        });
                    }
                    emit.send(DiscoveredObject::Cluster {
                        name: display(&c.name, &c.id),
                        id: c.id,
                        labels: c.labels,
                        namespaces_listed,
                    })
                    .await
                })
                .buffer_unordered(self.config.concurrency);
            while let Some(r) = listings.next().await {
                r?;
            }
            Ok::<(), Stop>(())
        };
        let projects = self.stream::<Project, _>(&["v3", "projects"], "projects", &emit, |p| {
            let cluster_id = nonempty(&p.cluster_id)
                .map(str::to_string)
                .unwrap_or_else(|| p.id.split(':').next().unwrap_or_default().to_string());
            Some(DiscoveredObject::Project {
                name: display(&p.name, &p.id),
                id: p.id,
                cluster_id,
                labels: p.labels,
            })
        });
        let global_roles = self.stream::<GlobalRole, _>(&["v3", "globalroles"], "global roles", &emit, |r| {
            Some(DiscoveredObject::GlobalRole {
                name: display(&r.name, &r.id),
                id: r.id,
                builtin: r.builtin,
            })
        });
        let role_templates = self.stream::<RoleTemplate, _>(&["v3", "roletemplates"], "role templates", &emit, |r| {
            Some(DiscoveredObject::RoleTemplate {
                name: display(&r.name, &r.id),
                id: r.id,
                context: r.context,
                locked: r.locked,
            })
        });
        let users = self.stream::<User, _>(&["v3", "users"], "users", &emit, |u| {
            let username = u.username().map(str::to_string);
            Some(DiscoveredObject::User {
                name: display(&u.name, username.as_deref().unwrap_or(&u.id)),
                id: u.id,
                username,
                principal_ids: u.principal_ids,
            })
        });
        let grbs = self.stream::<Binding, _>(&["v3", "globalrolebindings"], "global role bindings", &emit, |b| {
            binding_object(b, BindingScope::Global)
        });
        let crtbs = self.stream::<Binding, _>(
            &["v3", "clusterroletemplatebindings"],
            "cluster role bindings",
            &emit,
            |b| binding_object(b, BindingScope::Cluster),
        );
        let prtbs = self.stream::<Binding, _>(
            &["v3", "projectroletemplatebindings"],
            "project role bindings",
            &emit,
            |b| {
                self.learn_project_namespace(&b);
                binding_object(b, BindingScope::Project)
            },
        );

        let outcome = tokio::try_join!(
            namespaces_then_clusters,
            projects,
            global_roles,
            role_templates,
            users,
            grbs,
            crtbs,
            prtbs
        );
        match outcome {
            Ok(_) => {}
            Err(Stop::Closed) => tracing::info!("discovery receiver closed; stopping early"),
            Err(Stop::Failed(e)) => return Err(e),
        }
        let counts = emit.counts.into_inner().unwrap_or_default();
        let mut skipped_clusters = emit.skipped.into_inner().unwrap_or_default();
        skipped_clusters.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(DiscoverySummary {
            objects: counts.values().sum(),
            requests: self.client.requests().saturating_sub(requests_before),
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            counts,
            skipped_clusters,
        })
    }

    /// Streams every page of a collection through `map` into the sink.
    async fn stream<T, F>(&self, segments: &[&str], what: &str, emit: &Emitter<'_>, mut map: F) -> Result<(), Stop>
    where
        T: DeserializeOwned + HasId,
        F: FnMut(T) -> Option<DiscoveredObject>,
    {
        let mut pager = self.client.list::<T>(segments, &[], what);
        while let Some(page) = pager.next_page().await? {
            for item in page {
                if let Some(object) = map(item) {
                    emit.send(object).await?;
                }
            }
        }
        Ok(())
    }

    /// One cluster's namespaces, streamed into the sink. `Some(reason)` when they could not all
    /// be listed: the cluster is skipped, not fatal (see the module doc). The deadline counts only
    /// the time spent waiting on Rancher, not on a slow receiver.
    async fn cluster_namespaces(&self, cluster_id: &str, emit: &Emitter<'_>) -> Result<Option<String>, Stop> {
        let what = format!("namespaces of cluster {cluster_id}");
        let mut pager = self
            .client
            .list::<Namespace>(&["v3", "cluster", cluster_id, "namespaces"], &[], what)
            .with_attempts(NAMESPACE_ATTEMPTS);
        let mut budget = self.config.cluster_timeout;
        loop {
            let asked = Instant::now();
            let next = tokio::time::timeout(budget, pager.next_page_raw()).await;
            budget = budget.saturating_sub(asked.elapsed());
            let failure = match next {
                Ok(Ok(Some(page))) => {
                    for ns in page {
                        let name = display(&ns.name, &ns.id);
                        emit.send(DiscoveredObject::Namespace {
                            // Namespace names repeat across clusters: the id carries the cluster.
                            id: format!("{cluster_id}:{}", ns.id),
                            name,
                            cluster_id: cluster_id.to_string(),
                            project_id: nonempty(&ns.project_id).map(str::to_string),
                        })
                        .await?;
                    }
                    continue;
                }
                Ok(Ok(None)) => return Ok(None),
                // A refused key fails every request, not this cluster's alone: the executor
                // re-reads the secret on CredentialsRefused.
                Ok(Err(PageError::Api(e))) if e.status() == Some(401) => return Err(Stop::Failed(e.into_error())),
                Ok(Err(PageError::Api(e))) => e.summary(),
                Ok(Err(PageError::Loop(e))) => e.to_string(),
                Err(_) => timed_out(cluster_id, self.config.cluster_timeout),
            };
            tracing::warn!(
                cluster = cluster_id, error = %failure,
                "skipping the namespaces of a cluster that cannot be listed (is its agent disconnected?); discovery goes on"
            );
            return Ok(Some(failure));
        }
    }
}

fn timed_out(cluster_id: &str, deadline: Duration) -> String {
    format!(
        "GET /v3/cluster/{cluster_id}/namespaces got no answer within {}s (cluster_timeout_seconds); \
         a cluster whose agent is disconnected stalls like this",
        deadline.as_secs()
    )
}

/// A display name, or the id when there is none.
fn display(name: &str, fallback: &str) -> String {
    if name.trim().is_empty() {
        fallback.to_string()
    } else {
        name.to_string()
    }
}

/// A binding of any kind as a discovered object; one being removed is left out.
fn binding_object(b: Binding, scope: BindingScope) -> Option<DiscoveredObject> {
    if b.is_removed() {
        return None;
    }
    let (resource_id, role_id) = match scope {
        BindingScope::Global => ("global".to_string(), nonempty(&b.global_role_id)),
        BindingScope::Cluster => (
            nonempty(&b.cluster_id)
                .map(str::to_string)
                .unwrap_or_else(|| b.id.split(':').next().unwrap_or_default().to_string()),
            nonempty(&b.role_template_id),
        ),
        // Never parsed from the id: a PRTB's namespace is `p-y` or `c-x-p-y`.
        BindingScope::Project => (
            nonempty(&b.project_id).unwrap_or_default().to_string(),
            nonempty(&b.role_template_id),
        ),
    };
    Some(DiscoveredObject::Binding {
        name: b.object_name().to_string(),
        role_id: role_id.unwrap_or_default().to_string(),
        user_id: nonempty(&b.user_id).map(str::to_string),
        user_principal_id: nonempty(&b.user_principal_id).map(str::to_string),
        group_principal_id: nonempty(&b.group_principal_id).map(str::to_string),
        id: b.id,
        scope,
        resource_id,
    })
}
