//! Which replica holds each instance: this one (its stream is here) or another (served as that
//! replica published it, "remote"). See `crate::replicas` for how the store keeps them in step.

use super::{Instance, InstanceRecord, Registry};

/// An instance this replica holds, as it is to be written to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalInstance {
    /// What is persisted.
    pub record: InstanceRecord,
    /// Whether its stream is open.
    pub connected: bool,
    /// When that stream opened (Unix ms).
    pub started_ms: i64,
}

/// What [`Registry::upsert_remote`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteUpsert {
    /// The instance is now (or still) served as the other replica published it; the epoch to
    /// expire it with when it is disconnected.
    Applied(u64),
    /// This replica holds a newer stream of the same proxy: kept ours.
    KeptLocal,
}

impl Registry {
    /// An instance this replica holds, as it is to be persisted (`None` when it is withdrawn or
    /// held by another replica).
    pub fn local(&self, proxy_id: &str) -> Option<LocalInstance> {
        let inner = self.lock();
        let i = inner
            .instances
            .get(proxy_id)
            .filter(|i| i.owner.is_none())?;
        Some(LocalInstance {
            record: InstanceRecord {
                node: i.node.clone(),
                identity: i.identity.clone(),
                entity: i.entity.clone(),
                registration: i.registration.clone(),
                healthy: i.healthy,
                health_detail: i.health_detail.clone(),
                cert_not_after: i.cert_not_after,
            },
            connected: i.connected,
            started_ms: i.started_ms,
        })
    }

    /// The proxy ids of every instance this replica holds.
    pub fn local_ids(&self) -> Vec<String> {
        let inner = self.lock();
        inner
            .instances
            .iter()
            .filter(|(_, i)| i.owner.is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The proxy ids of every instance another replica holds, with that replica.
    pub fn remote_ids(&self) -> Vec<(String, String)> {
        let inner = self.lock();
        inner
            .instances
            .iter()
            .filter_map(|(id, i)| Some((id.clone(), i.owner.clone()?)))
            .collect()
    }

    /// Serves an instance as replica `owner` published it (or as a previous run left it, when
    /// `connected` is false): every endpoint is served by every replica. A local stream of the
    /// same proxy that is older than `started_ms` is closed: the proxy moved.
    pub fn upsert_remote(
        &self,
        rec: InstanceRecord,
        owner: &str,
        connected: bool,
        started_ms: i64,
    ) -> RemoteUpsert {
        let mut inner = self.lock();
        let proxy_id = rec.node.proxy_id.clone();
        let mut endpoint_ids = Vec::new();
        let mut held = None;
        if let Some(cur) = inner.instances.get_mut(&proxy_id) {
            match &cur.owner {
                None if cur.started_ms > started_ms => return RemoteUpsert::KeptLocal,
                None => {
                    if let Some(close) = cur.close.take() {
                        let _ = close.send(format!(
                            "this proxy opened a newer stream on control-plane replica {owner}"
                        ));
                    }
                }
                Some(o)
                    if o == owner
                        && cur.started_ms == started_ms
                        && cur.connected == connected
                        && cur.healthy == rec.healthy
                        && cur.health_detail == rec.health_detail
                        && cur.registration == rec.registration =>
                {
                    return RemoteUpsert::Applied(cur.epoch);
                }
                Some(_) => {}
            }
            endpoint_ids = std::mem::take(&mut cur.endpoint_ids);
            held = cur.held;
        }
        let epoch = inner.next_epoch;
        inner.next_epoch += 1;
        inner.instances.insert(
            proxy_id.clone(),
            Instance {
                owner: Some(owner.to_owned()),
                orphaned: false,
                started_ms,
                node: rec.node,
                identity: rec.identity,
                entity: rec.entity,
                registration: rec.registration,
                healthy: rec.healthy,
                health_detail: rec.health_detail,
                connected,
                epoch,
                held,
                cert_not_after: rec.cert_not_after,
                since: crate::ca::unix_now(),
                close: None,
                endpoint_ids,
                refused: Vec::new(),
            },
        );
        inner.republish(&proxy_id);
        inner.bump();
        self.notify(&mut inner);
        RemoteUpsert::Applied(epoch)
    }

    /// Withdraws an instance another replica held, now gone from the store. Instances this
    /// replica holds are left alone.
    pub fn remove_remote(&self, proxy_id: &str) -> bool {
        let mut inner = self.lock();
        if inner
            .instances
            .get(proxy_id)
            .is_none_or(|i| i.owner.is_none())
        {
            return false;
        }
        inner.publish(proxy_id, Vec::new());
        inner.instances.remove(proxy_id);
        inner.bump();
        self.notify(&mut inner);
        true
    }

    /// Marks every instance held by replica `owner` disconnected (that replica is gone): their
    /// endpoints stay while their proxies reconnect elsewhere. Returns (proxy id, epoch, stream
    /// start) of each not orphaned before, to expire after the grace period.
    pub fn orphan(&self, owner: &str) -> Vec<(String, u64, i64)> {
        let mut inner = self.lock();
        let now = crate::ca::unix_now();
        let mut out = Vec::new();
        for (id, inst) in inner.instances.iter_mut() {
            if inst.owner.as_deref() == Some(owner) && !inst.orphaned {
                inst.orphaned = true;
                if inst.connected {
                    inst.connected = false;
                    inst.since = now;
                }
                out.push((id.clone(), inst.epoch, inst.started_ms));
            }
        }
        if !out.is_empty() {
            inner.bump();
            self.notify(&mut inner);
        }
        out
    }

    /// Closes this replica's stream of `proxy_id` if it is the one that opened at
    /// `started_ms`: the store says a newer stream of that proxy is held elsewhere.
    pub fn close_stale(&self, proxy_id: &str, started_ms: i64) -> bool {
        let mut inner = self.lock();
        match inner.instances.get_mut(proxy_id) {
            Some(inst) if inst.owner.is_none() && inst.started_ms == started_ms => {
                match inst.close.take() {
                    Some(close) => {
                        let _ = close.send(
                            "this proxy opened a newer stream on another control-plane replica"
                                .into(),
                        );
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        }
    }

    /// Whether the instance is still the disconnected one of `epoch` (its grace is running).
    pub fn is_disconnected(&self, proxy_id: &str, epoch: u64) -> bool {
        self.lock()
            .instances
            .get(proxy_id)
            .is_some_and(|i| i.epoch == epoch && !i.connected)
    }
}

#[cfg(test)]
mod tests {
    use capmesh_api::{MeshSettings, Node, Policy, Registration, TrustBundle};

    use super::*;

    fn registry() -> std::sync::Arc<Registry> {
        let trust = TrustBundle {
            trust_domain: "capmesh.local".parse().unwrap(),
            ca_pems: vec![],
            entities: vec![],
            revoked_entities: vec![],
            revoked_serials: vec![],
            revoked_identities: vec![],
        };
        std::sync::Arc::new(Registry::new(
            "r1",
            trust,
            Policy::default(),
            MeshSettings::default(),
        ))
    }

    fn record(proxy_id: &str) -> InstanceRecord {
        InstanceRecord {
            node: Node {
                proxy_id: proxy_id.into(),
                agent: "weather".parse().unwrap(),
                namespace: "default".parse().unwrap(),
                zone: None,
            },
            identity: "spiffe://capmesh.local/ns/default/agent/weather".into(),
            entity: None,
            registration: Registration {
                endpoint: "127.0.0.1:1".into(),
                tags: vec![],
                version: None,
                tools: vec![],
                dependencies: vec![],
            },
            healthy: true,
            health_detail: None,
            cert_not_after: None,
        }
    }

    #[tokio::test]
    async fn the_newest_stream_of_a_proxy_wins_and_a_gone_replica_is_orphaned_once() {
        let reg = registry();
        let r = record("p1");
        let mut lease = reg
            .connect(
                r.node.clone(),
                r.identity.clone(),
                None,
                None,
                r.registration.clone(),
            )
            .unwrap();
        assert!(reg.local("p1").is_some());

        // An older stream held elsewhere does not take it from us.
        let older = reg.upsert_remote(record("p1"), "r2", true, lease.started_ms - 1);
        assert_eq!(older, RemoteUpsert::KeptLocal);
        assert!(reg.local("p1").is_some());

        // A newer one does: our stream is told why and the instance is served as r2's.
        let newer = reg.upsert_remote(record("p1"), "r2", true, lease.started_ms + 1);
        assert!(matches!(newer, RemoteUpsert::Applied(_)));
        let why = (&mut lease.closed).await.unwrap();
        assert!(why.contains("newer stream") && why.contains("r2"), "{why}");
        assert!(reg.local("p1").is_none());
        assert_eq!(reg.remote_ids(), vec![("p1".to_owned(), "r2".to_owned())]);
        assert!(
            !reg.disconnect("p1", lease.epoch, true),
            "the old stream's end withdraws nothing"
        );

        // r2 is gone: its instance is orphaned once (one grace timer), then expired.
        let orphans = reg.orphan("r2");
        assert_eq!(orphans.len(), 1);
        assert!(reg.orphan("r2").is_empty(), "not orphaned twice");
        let (_, epoch, _) = orphans[0];
        assert!(reg.is_disconnected("p1", epoch));
        assert!(reg.expire("p1", epoch));
        assert!(reg.remote_ids().is_empty());
        assert!(!reg.remove_remote("p1"));
    }
}
