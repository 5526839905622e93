//! Instance ownership and replicas sharing one store.
//!
//! Every instance row names the replica whose stream holds it (`owner`) and when that stream
//! opened (`started_ms`). This module keeps the rows true and the registry in step with them:
//!
//! - [`Writer`]: this replica's instances are written by one task, from a set of dirty proxy ids
//!   (the registry's current state is read at write time, so a burst of health flips is one
//!   write). A row is claimed only if no newer stream holds it; a lost claim closes our stream.
//!   Writes that fail (store down) stay dirty and are retried when it answers again.
//! - [`follow`] (PostgreSQL): the other replicas' changes, pushed by LISTEN/NOTIFY, applied to the
//!   registry (their instances are served here as "remote"), the policy (with its `provide`
//!   rules), the mesh settings, and the trust (entities, revocations).
//!   After every (re)connection everything is reloaded, because notifications sent meanwhile
//!   are lost.
//! - [`heartbeat`] (PostgreSQL): each replica renews a lease every [`HEARTBEAT`]; the instances
//!   of a replica whose lease lapsed stay published for the grace period while their proxies
//!   reconnect elsewhere, then are withdrawn. The lease is liveness, not change delivery:
//!   changes are never found by polling.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, watch};

use crate::App;
use crate::registry::{InstanceRecord, RemoteUpsert};
use crate::store::follow::Followed;
use crate::store::{Change, InstanceWrite, Store, StoreError, StoredInstance, WriteOutcome};

/// How often a replica renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a lease lasts: a replica silent for this long is taken for dead.
pub const LEASE: Duration = Duration::from_secs(5);

/// Writes per store transaction.
const BATCH: usize = 500;

/// A fresh replica id: the host name (the pod's name on Kubernetes) and 6 random hex digits.
pub fn new_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "cp".into());
    let suffix = crate::ca::random_hex(3).unwrap_or_else(|_| {
        format!(
            "{:06x}",
            crate::registry::unix_ms().unsigned_abs() % 0x100_0000
        )
    });
    format!("{host}-{suffix}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Write the instance as the registry has it now.
    Changed,
    /// Delete its row (if still this stream's) unless the registry holds it again.
    Gone { started_ms: i64 },
}

/// This replica's pending instance writes.
#[derive(Debug, Default)]
pub struct Writer {
    dirty: Mutex<HashMap<String, Pending>>,
    wake: Notify,
}

impl Writer {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The instance changed (connected, re-registered, health, disconnected): write it.
    pub fn mark(&self, proxy_id: &str) {
        self.lock()
            .entry(proxy_id.to_owned())
            .or_insert(Pending::Changed);
        self.wake.notify_one();
    }

    /// The instance of the stream that opened at `started_ms` was withdrawn: delete its row.
    pub fn mark_gone(&self, proxy_id: &str, started_ms: i64) {
        self.lock()
            .insert(proxy_id.to_owned(), Pending::Gone { started_ms });
        self.wake.notify_one();
    }

    /// How many writes wait.
    pub fn backlog(&self) -> usize {
        self.lock().len()
    }

    fn take(&self) -> Vec<(String, Pending)> {
        self.lock().drain().collect()
    }

    /// Puts back writes that failed, unless newer ones for the same ids came meanwhile.
    fn restore(&self, failed: Vec<(String, Pending)>) {
        let mut dirty = self.lock();
        for (id, p) in failed {
            dirty.entry(id).or_insert(p);
        }
    }
}

fn stored(app: &App, proxy_id: &str) -> Option<InstanceWrite> {
    let local = app.registry.local(proxy_id)?;
    let record_json = match serde_json::to_string(&local.record) {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(proxy_id, error = %e, "cannot serialize the instance; not persisted");
            return None;
        }
    };
    Some(InstanceWrite::Claim(StoredInstance {
        proxy_id: proxy_id.to_owned(),
        record_json,
        owner: app.replica.clone(),
        connected: local.connected,
        started_ms: local.started_ms,
    }))
}

/// Writes this replica's instances until `stop` flips.
pub async fn write(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut failing: Option<Instant> = None;
    let mut retry = Duration::from_millis(100);
    loop {
        if app.writer.backlog() == 0 {
            tokio::select! {
                _ = stop.changed() => return,
                _ = app.writer.wake.notified() => {}
            }
        }
        let batch = app.writer.take();
        let mut start = 0;
        while start < batch.len() {
            let chunk = &batch[start..batch.len().min(start + BATCH)];
            let mut writes = Vec::with_capacity(chunk.len());
            for (id, pending) in chunk {
                match (stored(&app, id), pending) {
                    (Some(w), _) => writes.push(w),
                    (None, Pending::Gone { started_ms }) => writes.push(InstanceWrite::Remove {
                        proxy_id: id.clone(),
                        owner: app.replica.clone(),
                        started_ms: *started_ms,
                    }),
                    (None, Pending::Changed) => {}
                }
            }
            let result = if writes.is_empty() {
                Ok(Vec::new())
            } else {
                app.store.write_instances(&writes).await
            };
            match result {
                Ok(outcomes) => {
                    if !writes.is_empty() {
                        app.metrics.store_up.set(1);
                    }
                    if let Some(since) = failing.take() {
                        tracing::info!(
                            after_ms = since.elapsed().as_millis() as u64,
                            "the store answers again; instance writes resumed"
                        );
                    }
                    retry = Duration::from_millis(100);
                    for (w, outcome) in writes.iter().zip(outcomes) {
                        if let (InstanceWrite::Claim(i), WriteOutcome::NotOurs) = (w, outcome)
                            && app.registry.close_stale(&i.proxy_id, i.started_ms)
                        {
                            tracing::info!(proxy_id = %i.proxy_id, "a newer stream of this proxy is held by another replica; closed ours");
                        }
                    }
                    start += BATCH;
                }
                Err(e) => {
                    app.metrics.store_up.set(0);
                    if failing.is_none() {
                        tracing::warn!(error = %e, "cannot write instances to the store; kept in memory and retried (streams keep being served)");
                        failing = Some(Instant::now());
                    }
                    // Everything not yet written goes back.
                    app.writer.restore(batch[start..].to_vec());
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(2));
                    break;
                }
            }
        }
    }
}

/// Serves a stored row of another replica's instance (or drops an unreadable one).
fn apply_row(app: &App, row: StoredInstance) {
    if row.owner == app.replica {
        // Ours. Unless we hold it no more (its removal is queued), nothing to do.
        return;
    }
    let record: InstanceRecord = match serde_json::from_str(&row.record_json) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(proxy_id = %row.proxy_id, error = %e, "ignoring an unreadable stored instance");
            return;
        }
    };
    if record.node.proxy_id != row.proxy_id {
        tracing::warn!(proxy_id = %row.proxy_id, "ignoring a stored instance whose record names another proxy");
        return;
    }
    if app
        .registry
        .upsert_remote(record, &row.owner, row.connected, row.started_ms)
        == RemoteUpsert::KeptLocal
    {
        // Our stream is newer: make sure the store says so.
        app.writer.mark(&row.proxy_id);
    }
}

/// Applies the rows of `ids` as the store has them now.
async fn apply_instances(app: &App, ids: Vec<String>) -> Result<(), StoreError> {
    let rows = app.store.instances_by_id(&ids).await?;
    let found: HashSet<&str> = rows.iter().map(|r| r.proxy_id.as_str()).collect();
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !found.contains(id.as_str()))
        .cloned()
        .collect();
    for row in rows {
        apply_row(app, row);
    }
    for id in missing {
        if app.registry.local(&id).is_some() {
            // Our row went (another replica took us for dead): write it again.
            app.writer.mark(&id);
        } else {
            app.registry.remove_remote(&id);
        }
    }
    Ok(())
}

/// Reloads the policy from the store and pushes it if it changed.
pub async fn reload_policy(app: &App) -> Result<(), StoreError> {
    let policy = app.store.policy().await?.unwrap_or_default();
    app.registry.set_policy(policy);
    Ok(())
}

/// Reloads the mesh settings from the store and pushes them if they changed (the session key
/// stays this process's).
pub async fn reload_settings(app: &App) -> Result<(), StoreError> {
    if let Some(settings) = app.store.settings().await? {
        app.registry.set_settings(settings);
    }
    Ok(())
}

/// Reloads the entities and revocations: trust applied here (streams of revoked peers are
/// closed) and pushed.
pub async fn reload_entities(app: &App) -> Result<(), crate::error::Error> {
    crate::entities::apply_trust(app).await?;
    Ok(())
}

/// Loads everything another replica may have changed while we were not listening.
async fn resync(app: &App) -> Result<(), StoreError> {
    reload_policy(app).await?;
    reload_settings(app).await?;
    if let Err(e) = reload_entities(app).await {
        tracing::warn!(error = %e, "cannot reload the entities");
    }
    let rows = app.store.instances().await?;
    let stored: HashSet<String> = rows.iter().map(|r| r.proxy_id.clone()).collect();
    for row in rows {
        apply_row(app, row);
    }
    for (id, _) in app.registry.remote_ids() {
        if !stored.contains(&id) {
            app.registry.remove_remote(&id);
        }
    }
    // What we hold may not have been written while the store was away.
    for id in app.registry.local_ids() {
        app.writer.mark(&id);
    }
    Ok(())
}

/// Applies the other replicas' changes as the PostgreSQL store reports them, until `stop`.
pub async fn follow(
    app: Arc<App>,
    mut events: mpsc::Receiver<Followed>,
    mut stop: watch::Receiver<bool>,
) {
    let mut resync_pending = false;
    loop {
        // A reload that failed is tried again after a pause even if nothing else happens.
        let retry = if resync_pending {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(3600)
        };
        let first = tokio::select! {
            _ = stop.changed() => return,
            e = events.recv() => match e { Some(e) => Some(e), None => return },
            _ = tokio::time::sleep(retry) => None,
        };
        // Take whatever else is queued: one round trip for a burst of changes.
        let mut batch: Vec<Followed> = first.into_iter().collect();
        while batch.len() < 4096 {
            match events.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut policy = false;
        let mut settings = false;
        let mut entities = false;
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for e in batch {
            match e {
                Followed::Resync => resync_pending = true,
                Followed::Lost(why) => {
                    tracing::warn!(reason = %why, "lost the store's change notifications; reconnecting (changes made on other replicas wait until then)");
                }
                Followed::Change(Change::Policy) => policy = true,
                Followed::Change(Change::Settings) => settings = true,
                // Both feed the trust in force: reloaded together.
                Followed::Change(Change::Entities | Change::Revocations) => entities = true,
                Followed::Change(Change::Instance(id)) => {
                    ids.insert(id);
                }
            }
        }
        if resync_pending {
            match resync(&app).await {
                Ok(()) => {
                    resync_pending = false;
                    tracing::info!("following the other replicas' changes");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot reload from the store; retrying");
                    continue;
                }
            }
            continue;
        }
        if policy && let Err(e) = reload_policy(&app).await {
            tracing::warn!(error = %e, "cannot reload the policy another replica changed");
            resync_pending = true;
        }
        if settings && let Err(e) = reload_settings(&app).await {
            tracing::warn!(error = %e, "cannot reload the settings another replica changed");
            resync_pending = true;
        }
        if entities && let Err(e) = reload_entities(&app).await {
            tracing::warn!(error = %e, "cannot reload the entities another replica changed");
            resync_pending = true;
        }
        if !ids.is_empty()
            && let Err(e) = apply_instances(&app, ids.into_iter().collect()).await
        {
            tracing::warn!(error = %e, "cannot read the instances another replica changed");
            resync_pending = true;
        }
    }
}

/// After the grace period: withdraws a disconnected instance of a replica that is gone, unless
/// it reconnected somewhere meanwhile or that replica is back.
async fn expire_orphan(
    app: Arc<App>,
    proxy_id: String,
    epoch: u64,
    owner: String,
    started_ms: i64,
) {
    if !app.registry.is_disconnected(&proxy_id, epoch) || app.is_live(&owner) {
        return;
    }
    let remove = [InstanceWrite::Remove {
        proxy_id: proxy_id.clone(),
        owner: owner.clone(),
        started_ms,
    }];
    match app.store.write_instances(&remove).await {
        Ok(outcomes) if outcomes.first() == Some(&WriteOutcome::NotOurs) => {}
        result => {
            if let Err(e) = result {
                tracing::warn!(proxy_id = %proxy_id, error = %e, "cannot remove a gone replica's instance from the store; withdrawn here");
            }
            if app.registry.expire(&proxy_id, epoch) {
                tracing::info!(proxy_id = %proxy_id, replica = %owner, "its replica is gone and it did not reconnect; endpoints withdrawn");
            }
        }
    }
}

/// Starts the grace timers for the instances of `owner`, a replica that is gone.
pub fn orphan(app: &Arc<App>, owner: &str, grace: Duration) -> usize {
    let orphans = app.registry.orphan(owner);
    for (proxy_id, epoch, started_ms) in &orphans {
        let app = app.clone();
        let (proxy_id, owner, started_ms, epoch) =
            (proxy_id.clone(), owner.to_owned(), *started_ms, *epoch);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            expire_orphan(app, proxy_id, epoch, owner, started_ms).await;
        });
    }
    orphans.len()
}

/// Loads every stored instance at start: the other live replicas' are served as theirs; those
/// of replicas that are gone (a previous run of this one included) are served for
/// `restart_grace` while their proxies reconnect.
pub async fn restore(app: &Arc<App>, restart_grace: Duration) -> Result<usize, StoreError> {
    let rows = app.store.instances().await?;
    let count = rows.len();
    let mut owners = BTreeSet::new();
    for row in rows {
        owners.insert(row.owner.clone());
        apply_row(app, row);
    }
    for owner in owners {
        if !app.is_live(&owner) {
            orphan(app, &owner, restart_grace);
        }
    }
    Ok(count)
}

/// Renews this replica's lease every [`HEARTBEAT`] and takes over from replicas whose leases
/// lapsed, until `stop`.
pub async fn heartbeat(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    // After the store comes back, every replica needs a beat to renew: until a whole lease has
    // passed, nobody is taken for dead.
    let mut answering_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        match app.store.heartbeat(&app.replica, LEASE).await {
            Ok(live) => {
                app.metrics.store_up.set(1);
                app.metrics.replicas.set(live.len() as i64);
                let since = *answering_since.get_or_insert_with(Instant::now);
                app.set_live(live);
                if since.elapsed() < LEASE {
                    continue;
                }
                let owners: BTreeSet<String> = app
                    .registry
                    .remote_ids()
                    .into_iter()
                    .map(|(_, owner)| owner)
                    .collect();
                for owner in owners {
                    if !app.is_live(&owner) {
                        let n = orphan(&app, &owner, app.grace);
                        if n > 0 {
                            tracing::warn!(replica = %owner, instances = n, grace_ms = app.grace.as_millis() as u64, "replica's lease lapsed: its instances stay while their proxies reconnect elsewhere");
                        }
                    }
                }
            }
            Err(e) => {
                app.metrics.store_up.set(0);
                if answering_since.take().is_some() {
                    tracing::warn!(error = %e, "cannot renew this replica's lease; streams keep being served from memory");
                }
            }
        }
    }
}
