//! The live registry: which proxies are connected, what their agents offer, and what each
//! subscriber needs to be told.
//!
//! Endpoints are indexed by capability, and every capability carries the generation at which it
//! last changed. A subscriber's [`View`] remembers the generation it saw per capability, so on a
//! change it diffs only the capabilities that moved: a change costs O(subscribers × changed
//! capabilities), not O(subscribers × endpoints). Endpoint maps are shared (`Arc`) between the
//! registry and every view, so a thousand views of the same capability cost one copy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use capmesh_api::rest::RefusedCapability;
use capmesh_api::{
    Capability, Delta, Dependency, DependencyTarget, Endpoint, EndpointId, MeshSettings, Node,
    Policy, Registration, Snapshot, SnapshotVersion, TrustBundle,
};
use tokio::sync::{Notify, oneshot};

use crate::subscribers::Subscribers;

mod ownership;
mod views;

pub use ownership::{LocalInstance, RemoteUpsert};

type EndpointMap = Arc<BTreeMap<EndpointId, Arc<Endpoint>>>;

#[derive(Debug, Clone)]
struct CapEntry {
    generation: u64,
    endpoints: EndpointMap,
}

/// One connected (or recently disconnected) proxy and its agent.
#[derive(Debug)]
struct Instance {
    /// `None` when this replica holds its stream; else the replica that does (or did).
    owner: Option<String>,
    /// Its owner is gone and its grace timer runs.
    orphaned: bool,
    /// When its current stream opened (Unix ms): the later of two streams owns the instance.
    started_ms: i64,
    node: Node,
    identity: String,
    entity: Option<String>,
    registration: Registration,
    healthy: bool,
    /// Why the agent is unhealthy, as its proxy said.
    health_detail: Option<String>,
    connected: bool,
    epoch: u64,
    held: Option<SnapshotVersion>,
    cert_not_after: Option<i64>,
    since: i64,
    close: Option<oneshot::Sender<String>>,
    endpoint_ids: Vec<(Capability, EndpointId)>,
    refused: Vec<RefusedCapability>,
}

#[derive(Debug)]
struct Inner {
    generation: u64,
    next_epoch: u64,
    instances: HashMap<String, Instance>,
    caps: BTreeMap<Capability, CapEntry>,
    known_generation: u64,
    trust: (u64, TrustBundle),
    policy: (u64, Policy),
    settings: (u64, MeshSettings),
    subscribers: Subscribers,
    /// Capabilities whose endpoints changed since subscribers were last woken.
    changed_caps: BTreeSet<Capability>,
    /// Whether something every subscriber sees changed since then.
    changed_for_all: bool,
    mesh_trust_domain: String,
}

/// What is persisted of an instance so a restarted control plane can keep serving it until its
/// proxy reconnects.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InstanceRecord {
    /// The proxy's node.
    pub node: Node,
    /// Its SPIFFE ID.
    pub identity: String,
    /// The entity that issued its certificate, if any.
    #[serde(default)]
    pub entity: Option<String>,
    /// Its registration.
    pub registration: Registration,
    /// Its agent's health as last reported.
    pub healthy: bool,
    /// Why its agent is unhealthy, as the proxy said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_detail: Option<String>,
    /// Its certificate's expiry as last seen.
    #[serde(default)]
    pub cert_not_after: Option<i64>,
}

/// A handle on one stream's registration: which instance, and which connection of it.
#[derive(Debug)]
pub struct Lease {
    /// The proxy id.
    pub proxy_id: String,
    /// Distinguishes this connection from earlier and later ones of the same proxy.
    pub epoch: u64,
    /// When this stream opened (Unix ms), as written to the store.
    pub started_ms: i64,
    /// Fires with a reason when the control plane wants this stream closed (replaced by a newer
    /// connection of the same proxy, or its entity revoked).
    pub closed: oneshot::Receiver<String>,
}

/// What one subscriber was last sent.
#[derive(Debug, Clone)]
pub struct View {
    /// The version the subscriber was last sent.
    pub version: SnapshotVersion,
    deps: Vec<Dependency>,
    caps: HashMap<Capability, (u64, EndpointMap)>,
    known_generation: u64,
    trust_generation: u64,
    policy_generation: u64,
    settings_generation: u64,
}

/// The live registry. Cheap to share (`Arc<Registry>`); a mutation wakes the subscribers it
/// concerns ([`crate::subscribers`]).
///
/// It holds this replica's instances (their streams are here) and, with a shared store, the
/// other replicas' instances as they published them ("remote"): every replica serves every
/// endpoint.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    replica: String,
}

/// A stream's subscription: woken when something it depends on changed. Dropping it
/// unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    registry: Arc<Registry>,
    id: u64,
    wake: Arc<Notify>,
}

impl Subscription {
    /// Resolves once something this subscriber depends on changed since the last time (cancel
    /// safe: a wake-up that arrives meanwhile is kept).
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Follows new dependencies (the agent re-registered).
    pub fn set_dependencies(&self, deps: &[Dependency]) {
        self.registry.lock().subscribers.set(self.id, deps);
    }

    /// Wakes this subscriber itself (to look at the registry again now).
    pub fn poke(&self) {
        self.wake.notify_one();
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.lock().subscribers.remove(self.id);
    }
}

/// The wall clock in Unix milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn covers_all(deps: &[Dependency]) -> bool {
    deps.iter().any(|d| d.capability == DependencyTarget::All)
}

/// The capabilities of `reg` that `identity` may not provide under `policy`'s `provide` rules
/// (by default: only identities of the mesh's trust domain `mesh`), with why.
pub fn refused_capabilities(
    policy: &Policy,
    mesh: &str,
    identity: &str,
    reg: &Registration,
) -> Vec<RefusedCapability> {
    let mut refused: Vec<RefusedCapability> = Vec::new();
    for tool in &reg.tools {
        let cap = tool.capability.as_str();
        if policy.may_provide(identity, cap, mesh)
            || refused.iter().any(|r| r.capability == tool.capability)
        {
            continue;
        }
        let named = policy.provide.iter().any(|r| {
            r.capabilities
                .iter()
                .any(|p| capmesh_api::glob_match(p, cap))
        });
        let why = if named {
            format!(
                "{identity} may not provide capability {cap:?}: the policy's provide rules for it do not list this identity (`capmesh policy get`)"
            )
        } else {
            format!(
                "{identity} may not provide capability {cap:?}: only identities of the mesh's trust domain {mesh} may, unless a provide rule names it"
            )
        };
        refused.push(RefusedCapability {
            capability: tool.capability.clone(),
            error: why,
        });
    }
    refused
}

fn endpoints_of(
    node: &Node,
    identity: &str,
    reg: &Registration,
    healthy: bool,
    refused: &[RefusedCapability],
) -> Vec<Endpoint> {
    reg.tools
        .iter()
        .filter(|tool| !refused.iter().any(|r| r.capability == tool.capability))
        .map(|tool| {
            let mut tags = reg.tags.clone();
            for t in &tool.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
            Endpoint {
                id: EndpointId::new(&node.namespace, &node.agent, &node.proxy_id, &tool.function),
                agent: node.agent.clone(),
                namespace: node.namespace.clone(),
                instance: node.proxy_id.clone(),
                identity: identity.to_owned(),
                address: reg.endpoint.clone(),
                zone: node.zone.clone(),
                capability: tool.capability.clone(),
                function: tool.function.clone(),
                version: tool.version.clone().or_else(|| reg.version.clone()),
                tags,
                description: tool.description.clone(),
                input_schema: tool.input_schema.clone(),
                healthy,
            }
        })
        .collect()
}

impl Inner {
    fn bump(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Replaces the endpoints an instance publishes. Capabilities whose endpoint set really
    /// changed get a new generation; others are left alone so subscribers skip them.
    fn publish(&mut self, proxy_id: &str, fresh: Vec<Endpoint>) -> bool {
        let old: Vec<(Capability, EndpointId)> = self
            .instances
            .get(proxy_id)
            .map(|i| i.endpoint_ids.clone())
            .unwrap_or_default();
        let mut touched: BTreeMap<Capability, BTreeMap<EndpointId, Arc<Endpoint>>> =
            BTreeMap::new();
        for (cap, _) in &old {
            touched.entry(cap.clone()).or_insert_with(|| {
                self.caps
                    .get(cap)
                    .map(|e| (*e.endpoints).clone())
                    .unwrap_or_default()
            });
        }
        for ep in &fresh {
            touched.entry(ep.capability.clone()).or_insert_with(|| {
                self.caps
                    .get(&ep.capability)
                    .map(|e| (*e.endpoints).clone())
                    .unwrap_or_default()
            });
        }
        for (cap, id) in &old {
            if let Some(map) = touched.get_mut(cap) {
                map.remove(id);
            }
        }
        let ids: Vec<(Capability, EndpointId)> = fresh
            .iter()
            .map(|e| (e.capability.clone(), e.id.clone()))
            .collect();
        for ep in fresh {
            if let Some(map) = touched.get_mut(&ep.capability) {
                let unchanged = map.get(&ep.id).is_some_and(|cur| **cur == ep);
                if !unchanged {
                    map.insert(ep.id.clone(), Arc::new(ep));
                }
            }
        }
        if let Some(inst) = self.instances.get_mut(proxy_id) {
            inst.endpoint_ids = ids;
        }
        let mut changed = false;
        let mut known_changed = false;
        for (cap, map) in touched {
            let same = match self.caps.get(&cap) {
                Some(cur) => *cur.endpoints == map,
                None => map.is_empty(),
            };
            if same {
                continue;
            }
            changed = true;
            self.changed_caps.insert(cap.clone());
            let generation = self.bump();
            if map.is_empty() {
                self.caps.remove(&cap);
                known_changed = true;
            } else {
                known_changed |= !self.caps.contains_key(&cap);
                self.caps.insert(
                    cap,
                    CapEntry {
                        generation,
                        endpoints: Arc::new(map),
                    },
                );
            }
        }
        if known_changed {
            self.known_generation = self.bump();
            self.changed_for_all = true;
        }
        changed
    }

    fn republish(&mut self, proxy_id: &str) -> bool {
        let Some(inst) = self.instances.get(proxy_id) else {
            return false;
        };
        let refused = refused_capabilities(
            &self.policy.1,
            &self.mesh_trust_domain,
            &inst.identity,
            &inst.registration,
        );
        let fresh = endpoints_of(
            &inst.node,
            &inst.identity,
            &inst.registration,
            inst.healthy,
            &refused,
        );
        if let Some(inst) = self.instances.get_mut(proxy_id) {
            inst.refused = refused;
        }
        self.publish(proxy_id, fresh)
    }

    fn known(&self) -> Vec<Capability> {
        self.caps.keys().cloned().collect()
    }

    fn relevant_caps(&self, deps: &[Dependency]) -> BTreeSet<Capability> {
        if covers_all(deps) {
            return self.caps.keys().cloned().collect();
        }
        deps.iter()
            .filter_map(|d| match &d.capability {
                DependencyTarget::One(c) => Some(c.clone()),
                DependencyTarget::All => None,
            })
            .collect()
    }
}

impl Registry {
    /// A registry for replica `replica` with the given trust bundle, policy and settings, and
    /// no agents.
    pub fn new(
        replica: impl Into<String>,
        trust: TrustBundle,
        policy: Policy,
        settings: MeshSettings,
    ) -> Self {
        Self {
            replica: replica.into(),
            inner: Mutex::new(Inner {
                mesh_trust_domain: trust.trust_domain.to_string(),
                generation: 1,
                next_epoch: 1,
                instances: HashMap::new(),
                caps: BTreeMap::new(),
                known_generation: 1,
                trust: (1, trust),
                policy: (1, policy),
                settings: (1, settings),
                subscribers: Subscribers::default(),
                changed_caps: BTreeSet::new(),
                changed_for_all: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Poisoning means a panic elsewhere; the registry's invariants hold between statements
        // that cannot panic, so keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the subscribers of whatever changed since the last call.
    fn notify(&self, inner: &mut Inner) {
        let caps = std::mem::take(&mut inner.changed_caps);
        let all = std::mem::take(&mut inner.changed_for_all);
        inner.subscribers.wake(&caps, all);
    }

    /// Subscribes a stream whose agent depends on `deps`.
    pub fn subscribe(self: &Arc<Self>, deps: &[Dependency]) -> Subscription {
        let (id, wake) = self.lock().subscribers.add(deps);
        Subscription {
            registry: self.clone(),
            id,
            wake,
        }
    }

    /// Registers a proxy's stream. A newer connection of the same proxy id replaces the older
    /// one (whose stream is told to close) and keeps its health, so a reconnect does not flap
    /// the proxy's endpoints. A proxy id belongs to the identity that registered it while that
    /// instance lives: a stream from another identity claiming it is refused (the message says
    /// whose it is), and the owner keeps serving.
    pub fn connect(
        &self,
        node: Node,
        identity: String,
        entity: Option<String>,
        cert_not_after: Option<i64>,
        registration: Registration,
    ) -> Result<Lease, String> {
        let mut inner = self.lock();
        if let Some(owner) = inner.instances.get(&node.proxy_id)
            && owner.identity != identity
        {
            return Err(format!(
                "proxy id {:?} belongs to {}, which registered it and is still live: each proxy needs its own id (leave --proxy-id unset to get a random one)",
                node.proxy_id, owner.identity
            ));
        }
        let epoch = inner.next_epoch;
        inner.next_epoch += 1;
        let (close_tx, closed) = oneshot::channel();
        let proxy_id = node.proxy_id.clone();
        // Never earlier than a stream of this proxy already known (a clock step back, or
        // another replica's clock ahead), so the newest stream always wins in the store.
        let started_ms = unix_ms().max(
            inner
                .instances
                .get(&proxy_id)
                .map_or(0, |i| i.started_ms + 1),
        );
        let previous = inner.instances.remove(&proxy_id);
        let (healthy, endpoint_ids) = match previous {
            Some(mut prev) => {
                if let Some(close) = prev.close.take() {
                    let _ = close.send("replaced by a newer stream from the same proxy".into());
                }
                (prev.healthy, prev.endpoint_ids)
            }
            None => (false, Vec::new()),
        };
        inner.instances.insert(
            proxy_id.clone(),
            Instance {
                owner: None,
                orphaned: false,
                started_ms,
                node,
                identity,
                entity,
                registration,
                healthy,
                health_detail: None,
                connected: true,
                epoch,
                held: None,
                cert_not_after,
                since: crate::ca::unix_now(),
                close: Some(close_tx),
                endpoint_ids,
                refused: Vec::new(),
            },
        );
        inner.republish(&proxy_id);
        inner.bump();
        self.notify(&mut inner);
        Ok(Lease {
            proxy_id,
            epoch,
            started_ms,
            closed,
        })
    }

    /// The capabilities of an instance's registration that were refused, with why.
    pub fn refused(&self, proxy_id: &str) -> Vec<RefusedCapability> {
        self.lock()
            .instances
            .get(proxy_id)
            .map(|i| i.refused.clone())
            .unwrap_or_default()
    }

    fn with_instance(&self, lease_id: &str, epoch: u64, f: impl FnOnce(&mut Instance) -> bool) {
        let mut inner = self.lock();
        let republish = match inner.instances.get_mut(lease_id) {
            Some(inst) if inst.epoch == epoch && inst.owner.is_none() => f(inst),
            _ => return,
        };
        if republish && inner.republish(lease_id) {
            self.notify(&mut inner);
        }
    }

    /// Records the agent's health (and why it is unhealthy, when the proxy says); flips its
    /// endpoints when it changed.
    pub fn set_health(&self, proxy_id: &str, epoch: u64, healthy: bool, detail: Option<String>) {
        self.with_instance(proxy_id, epoch, |inst| {
            let changed = inst.healthy != healthy;
            inst.healthy = healthy;
            inst.health_detail = if healthy { None } else { detail };
            changed
        });
    }

    /// Replaces the registration (the agent's tools changed).
    pub fn register(&self, proxy_id: &str, epoch: u64, registration: Registration) {
        self.with_instance(proxy_id, epoch, |inst| {
            inst.registration = registration;
            true
        });
    }

    /// Records the version a proxy acknowledged.
    pub fn ack(&self, proxy_id: &str, epoch: u64, version: SnapshotVersion) {
        self.with_instance(proxy_id, epoch, |inst| {
            inst.held = Some(version);
            false
        });
    }

    /// A stream ended. Graceful: withdraw now. Otherwise the endpoints stay until
    /// [`Registry::expire`] runs after the grace period. False when the stream was no longer
    /// the instance's current one (replaced, or moved to another replica).
    pub fn disconnect(&self, proxy_id: &str, epoch: u64, graceful: bool) -> bool {
        let mut inner = self.lock();
        match inner.instances.get_mut(proxy_id) {
            Some(inst) if inst.epoch == epoch && inst.owner.is_none() => {
                inst.connected = false;
                inst.since = crate::ca::unix_now();
                inst.close = None;
            }
            _ => return false,
        }
        if graceful {
            inner.publish(proxy_id, Vec::new());
            inner.instances.remove(proxy_id);
        }
        inner.bump();
        self.notify(&mut inner);
        true
    }

    /// Withdraws a disconnected instance if it has not reconnected since `epoch`.
    pub fn expire(&self, proxy_id: &str, epoch: u64) -> bool {
        let mut inner = self.lock();
        match inner.instances.get(proxy_id) {
            Some(inst) if inst.epoch == epoch && !inst.connected => {}
            _ => return false,
        }
        inner.publish(proxy_id, Vec::new());
        inner.instances.remove(proxy_id);
        inner.bump();
        self.notify(&mut inner);
        true
    }

    /// Closes every open stream whose certificate chains to `entity`.
    pub fn close_entity_streams(&self, entity: &str) -> usize {
        let mut inner = self.lock();
        let mut closed = 0;
        for inst in inner.instances.values_mut() {
            if inst.entity.as_deref() == Some(entity)
                && let Some(close) = inst.close.take()
            {
                let _ = close.send(format!("entity {entity:?} was revoked"));
                closed += 1;
            }
        }
        closed
    }

    /// Replaces the trust bundle pushed to every proxy.
    /// Unchanged trust is not pushed again.
    pub fn set_trust(&self, trust: TrustBundle) {
        let mut inner = self.lock();
        if inner.trust.1 == trust {
            return;
        }
        let generation = inner.bump();
        inner.trust = (generation, trust);
        inner.changed_for_all = true;
        self.notify(&mut inner);
    }

    /// Replaces the authorization policy pushed to every proxy, and applies its `provide`
    /// rules to every registration at once (a capability refused now is withdrawn; one
    /// allowed now is published).
    pub fn set_policy(&self, policy: Policy) {
        let mut inner = self.lock();
        if inner.policy.1 == policy {
            return;
        }
        let generation = inner.bump();
        inner.policy = (generation, policy);
        let ids: Vec<String> = inner.instances.keys().cloned().collect();
        for id in ids {
            inner.republish(&id);
        }
        inner.changed_for_all = true;
        self.notify(&mut inner);
    }

    /// Replaces the mesh settings pushed to every proxy; the mesh's session key is kept.
    /// Unchanged settings are not pushed again.
    pub fn set_settings(&self, mut settings: MeshSettings) {
        let mut inner = self.lock();
        settings.session_key = inner.settings.1.session_key.clone();
        if inner.settings.1 == settings {
            return;
        }
        let generation = inner.bump();
        inner.settings = (generation, settings);
        inner.changed_for_all = true;
        self.notify(&mut inner);
    }

    /// The mesh settings in force, without the session key.
    pub fn settings(&self) -> MeshSettings {
        MeshSettings {
            session_key: String::new(),
            ..self.lock().settings.1.clone()
        }
    }

    /// The full snapshot for a subscriber with these dependencies, and the view to diff from.
    pub fn snapshot(&self, deps: &[Dependency]) -> (Snapshot, View) {
        let inner = self.lock();
        let mut caps = HashMap::new();
        let mut endpoints = Vec::new();
        for cap in inner.relevant_caps(deps) {
            if let Some(entry) = inner.caps.get(&cap) {
                endpoints.extend(entry.endpoints.values().map(|e| (**e).clone()));
                caps.insert(cap, (entry.generation, entry.endpoints.clone()));
            }
        }
        let version = SnapshotVersion(inner.generation);
        let snapshot = Snapshot {
            version,
            endpoints,
            known_capabilities: inner.known(),
            trust: inner.trust.1.clone(),
            policy: inner.policy.1.clone(),
            settings: inner.settings.1.clone(),
        };
        let view = View {
            version,
            deps: deps.to_vec(),
            caps,
            known_generation: inner.known_generation,
            trust_generation: inner.trust.0,
            policy_generation: inner.policy.0,
            settings_generation: inner.settings.0,
        };
        (snapshot, view)
    }

    /// What changed for this subscriber since `view`; `None` when nothing it cares about did.
    /// `deps` may differ from the view's (the proxy re-registered with new dependencies).
    pub fn delta(&self, view: &mut View, deps: &[Dependency]) -> Option<Delta> {
        let inner = self.lock();
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        let relevant = inner.relevant_caps(deps);
        let mut seen: BTreeSet<Capability> = BTreeSet::new();
        for cap in &relevant {
            let current = inner.caps.get(cap);
            let previous = view.caps.get(cap);
            match (previous, current) {
                (Some((g, _)), Some(entry)) if *g == entry.generation => {}
                (prev, Some(entry)) => {
                    let old = prev.map(|(_, m)| m.clone()).unwrap_or_default();
                    for (id, ep) in entry.endpoints.iter() {
                        match old.get(id) {
                            Some(o) if Arc::ptr_eq(o, ep) || **o == **ep => {}
                            _ => upserts.push((**ep).clone()),
                        }
                    }
                    removals.extend(
                        old.keys()
                            .filter(|id| !entry.endpoints.contains_key(*id))
                            .cloned(),
                    );
                    view.caps
                        .insert(cap.clone(), (entry.generation, entry.endpoints.clone()));
                }
                (Some((_, old)), None) => {
                    removals.extend(old.keys().cloned());
                    view.caps.remove(cap);
                }
                (None, None) => {}
            }
            seen.insert(cap.clone());
        }
        // Capabilities the subscriber no longer covers (or that vanished under `*`).
        let gone: Vec<Capability> = view
            .caps
            .keys()
            .filter(|c| !seen.contains(*c))
            .cloned()
            .collect();
        for cap in gone {
            if let Some((_, old)) = view.caps.remove(&cap) {
                removals.extend(old.keys().cloned());
            }
        }
        let known = (view.known_generation != inner.known_generation).then(|| inner.known());
        let trust = (view.trust_generation != inner.trust.0).then(|| inner.trust.1.clone());
        let policy = (view.policy_generation != inner.policy.0).then(|| inner.policy.1.clone());
        let settings =
            (view.settings_generation != inner.settings.0).then(|| inner.settings.1.clone());
        view.known_generation = inner.known_generation;
        view.trust_generation = inner.trust.0;
        view.policy_generation = inner.policy.0;
        view.settings_generation = inner.settings.0;
        view.deps = deps.to_vec();
        if upserts.is_empty()
            && removals.is_empty()
            && known.is_none()
            && trust.is_none()
            && policy.is_none()
            && settings.is_none()
        {
            return None;
        }
        let base_version = view.version;
        view.version = SnapshotVersion(inner.generation.max(base_version.0 + 1));
        Some(Delta {
            version: view.version,
            base_version,
            upserts,
            removals,
            known_capabilities: known,
            trust,
            policy,
            settings,
        })
    }

    /// The dependencies an instance registered (for its stream's views).
    pub fn dependencies(&self, proxy_id: &str) -> Vec<Dependency> {
        self.lock()
            .instances
            .get(proxy_id)
            .map(|i| i.registration.dependencies.clone())
            .unwrap_or_default()
    }
}

/// When a frame was sent, to time its ack.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// The version sent.
    pub version: SnapshotVersion,
    /// When.
    pub at: Instant,
}
