//! Who is woken by a change. Each topology stream subscribes with its agent's dependencies: a
//! change to a capability's endpoints wakes only the streams that depend on that capability
//! (or on `*`); a change every stream sees (trust bundle, policy, settings, the set of known
//! capabilities) wakes them all. With thousands of registered agents that depend on nothing in
//! particular, a provider's health flip wakes its consumers, not the whole fleet.
//!
//! Wake-ups are `Notify` permits: one that arrives while its stream is busy is kept, so a stream
//! never misses that something changed (it then asks the registry what).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use capmesh_api::{Capability, Dependency, DependencyTarget};
use tokio::sync::Notify;

/// What a subscriber depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Interest {
    /// `*`: every capability.
    All,
    /// These capabilities.
    Caps(BTreeSet<Capability>),
}

fn interest(deps: &[Dependency]) -> Interest {
    let mut caps = BTreeSet::new();
    for d in deps {
        match &d.capability {
            DependencyTarget::All => return Interest::All,
            DependencyTarget::One(c) => {
                caps.insert(c.clone());
            }
        }
    }
    Interest::Caps(caps)
}

#[derive(Debug)]
struct Entry {
    wake: Arc<Notify>,
    interest: Interest,
}

/// Every subscriber, indexed by what it depends on.
#[derive(Debug, Default)]
pub struct Subscribers {
    next: u64,
    entries: HashMap<u64, Entry>,
    by_cap: HashMap<Capability, HashSet<u64>>,
    all: HashSet<u64>,
}

impl Subscribers {
    /// Adds a subscriber with these dependencies; returns its id and what wakes it.
    pub fn add(&mut self, deps: &[Dependency]) -> (u64, Arc<Notify>) {
        let id = self.next;
        self.next += 1;
        let wake = Arc::new(Notify::new());
        self.entries.insert(
            id,
            Entry {
                wake: wake.clone(),
                interest: Interest::Caps(BTreeSet::new()),
            },
        );
        self.set(id, deps);
        (id, wake)
    }

    /// Replaces a subscriber's dependencies (its agent re-registered).
    pub fn set(&mut self, id: u64, deps: &[Dependency]) {
        let fresh = interest(deps);
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        if entry.interest == fresh {
            return;
        }
        let old = std::mem::replace(&mut entry.interest, fresh.clone());
        self.unindex(id, &old);
        match fresh {
            Interest::All => {
                self.all.insert(id);
            }
            Interest::Caps(caps) => {
                for cap in caps {
                    self.by_cap.entry(cap).or_default().insert(id);
                }
            }
        }
    }

    fn unindex(&mut self, id: u64, interest: &Interest) {
        match interest {
            Interest::All => {
                self.all.remove(&id);
            }
            Interest::Caps(caps) => {
                for cap in caps {
                    if let Some(ids) = self.by_cap.get_mut(cap) {
                        ids.remove(&id);
                        if ids.is_empty() {
                            self.by_cap.remove(cap);
                        }
                    }
                }
            }
        }
    }

    /// Forgets a subscriber (its stream ended).
    pub fn remove(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            self.unindex(id, &entry.interest);
        }
    }

    /// Wakes the subscribers of `caps` and those of `*`; every subscriber when `everyone`.
    pub fn wake(&self, caps: &BTreeSet<Capability>, everyone: bool) {
        if everyone {
            for entry in self.entries.values() {
                entry.wake.notify_one();
            }
            return;
        }
        if caps.is_empty() {
            return;
        }
        let mut woken: HashSet<u64> = HashSet::new();
        for id in self
            .all
            .iter()
            .chain(caps.iter().filter_map(|c| self.by_cap.get(c)).flatten())
        {
            if woken.insert(*id)
                && let Some(entry) = self.entries.get(id)
            {
                entry.wake.notify_one();
            }
        }
    }

    /// How many subscribers there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(list: &[&str]) -> Vec<Dependency> {
        list.iter().map(|d| d.parse().unwrap()).collect()
    }

    fn caps(list: &[&str]) -> BTreeSet<Capability> {
        list.iter().map(|c| Capability::new(*c).unwrap()).collect()
    }

    /// Whether `wake` holds a permit (consumes it).
    async fn woken(wake: &Notify) -> bool {
        tokio::time::timeout(std::time::Duration::from_millis(1), wake.notified())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_change_wakes_the_dependents_of_its_capability_and_of_star_only() {
        let mut subs = Subscribers::default();
        let (_, weather) = subs.add(&deps(&["weather"]));
        let (_, star) = subs.add(&deps(&["*"]));
        let (idle_id, idle) = subs.add(&[]);
        subs.wake(&caps(&["weather"]), false);
        assert!(woken(&weather).await);
        assert!(woken(&star).await);
        assert!(!woken(&idle).await, "nothing it depends on changed");
        subs.wake(&caps(&["flights"]), false);
        assert!(!woken(&weather).await);
        assert!(woken(&star).await);
        subs.wake(&BTreeSet::new(), true);
        assert!(woken(&weather).await && woken(&star).await && woken(&idle).await);

        // New dependencies, new wake-ups; a removed subscriber is never woken.
        subs.set(idle_id, &deps(&["flights"]));
        subs.wake(&caps(&["flights"]), false);
        assert!(woken(&idle).await);
        subs.remove(idle_id);
        subs.wake(&caps(&["flights"]), false);
        assert!(!woken(&idle).await);
        assert_eq!(subs.len(), 2);
        assert!(
            !subs
                .by_cap
                .contains_key(&Capability::new("flights").unwrap())
        );
    }
}
