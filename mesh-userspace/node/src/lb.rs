//! The service load balancer's userspace half: turns a [`ServiceSet`] into map
//! contents, changing only what changed, in an order that never shows the
//! kernel a bad state.
//!
//! Update protocol for one service (each service is updated on its own):
//! 1. write the backends it will use (new ids only; ids belong to one service);
//! 2. write its slots in the generation the kernel is *not* reading;
//! 3. replace the service entry with one pointing at that generation (the
//!    commit point: the kernel swaps the element atomically);
//! 4. delete the old generation's slots and the backends no longer used.
//!
//! A failure before step 3 removes what steps 1-2 wrote and leaves the service
//! as it was. A kernel reader that raced with step 4 retries once from the
//! service entry (see `mesh-ebpf/src/lb.rs`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use mesh_common::{
    lb::{
        ALG_MAGLEV, ALG_RANDOM, Backend, INLINE_SLOTS, SVC_L7, Service, SvcKey, SvcStats,
        inline_slots,
    },
    maglev,
};

use super::maps::{LbMaps, MapOpError, SlotTable};
use lacewing_core::model::services::{
    Algorithm, BackendEntry, InvalidService, Protocol, ServiceCidr, ServiceEntry, ServiceSet,
};

/// How often session-affinity entries past their timeout are deleted.
const AFFINITY_SWEEP: Duration = Duration::from_secs(10);

/// Deletes expired session-affinity entries every [`AFFINITY_SWEEP`],
/// until the task is dropped: `LW_AFFINITY` is allocated on insert, not an
/// LRU, so nothing else makes room in it.
pub async fn sweep_affinity(lb: Arc<Mutex<LoadBalancer>>) {
    let mut tick = tokio::time::interval(AFFINITY_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let swept = lb
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sweep_affinity(lacewing_sys::os::monotonic_ns());
        match swept {
            Ok(0) => {}
            Ok(entries) => tracing::debug!(entries, "expired session affinity removed"),
            Err(err) => tracing::warn!(%err, "sweeping session affinity"),
        }
    }
}

/// Why an apply failed. Services not yet reached keep their previous state.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid services, nothing applied: {0}")]
    Invalid(#[from] InvalidService),
    #[error("updating {service}: {source}; it keeps its previous backends")]
    Map { service: String, source: MapOpError },
    #[error("reading the pinned maps: {0}")]
    Read(MapOpError),
    #[error("out of {0} ids")]
    Exhausted(&'static str),
    #[error(
        "updating {service}: its Maglev table of {need} entries does not fit: LW_MAGLEV's tables \
         hold {used} of the {capacity} entries --maglev-capacity allows (raise it, or use smaller \
         tables); it keeps its previous backends"
    )]
    MaglevFull {
        service: String,
        need: usize,
        used: u32,
        capacity: u32,
    },
}

/// What an apply changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// A service as installed in the maps.
#[derive(Clone, Debug)]
struct Installed {
    spec: ServiceEntry,
    id: u32,
    generation: u32,
    count: u32,
    /// `Service.flags` as installed.
    flags: u32,
    /// `Service.slots`: the live generation's slots when they fit inline.
    inline: [u32; INLINE_SLOTS],
    /// Backend id of each backend, by address.
    backend_ids: BTreeMap<SocketAddr, u32>,
}

impl Installed {
    fn table(&self) -> SlotTable {
        table_of(self.spec.algorithm, self.count)
    }
}

/// Per-service counters with the service's name, for metrics.
#[derive(Clone, Debug)]
pub struct ServiceStats {
    pub name: String,
    pub frontend: SocketAddr,
    pub protocol: Protocol,
    pub backends: usize,
    pub stats: SvcStats,
}

/// One service as `lacewing maps services` shows it.
#[derive(Clone, Debug)]
pub struct ServiceView {
    /// `namespace/name:port` (the port's number, as a client dials it).
    pub name: String,
    pub frontend: SocketAddr,
    pub protocol: Protocol,
    pub algorithm: String,
    pub affinity_timeout_s: u32,
    /// `addr:port`, with `*weight` when not 1.
    pub backends: Vec<String>,
    pub stats: SvcStats,
}

/// Owns the load balancer maps of one node.
pub struct LoadBalancer {
    maps: LbMaps,
    installed: BTreeMap<SvcKey, Installed>,
    /// Frontends with HTTP routes: meshed pods' connects to them are
    /// captured unbalanced ([`SVC_L7`]).
    routed: BTreeSet<SvcKey>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Entries all Maglev tables may hold together (`--maglev-capacity`):
    /// the tables are arrays of their own, so this is what bounds their
    /// memory (4 bytes an entry).
    maglev_capacity: u32,
}

impl LoadBalancer {
    /// Takes over the maps as they are, without flushing: reads what a previous
    /// daemon installed, so the next apply changes only what differs, and
    /// removes what a crash left half-written.
    pub fn reconcile(maps: LbMaps, maglev_capacity: u32) -> Result<Self, ApplyError> {
        let (mut lb, orphan_backends) = Self::read(maps)?;
        lb.maglev_capacity = maglev_capacity;
        // Orphans: backends of no service, slots of no live generation.
        for id in orphan_backends {
            lb.maps.delete_backend(id).map_err(ApplyError::Read)?;
        }
        let live: BTreeSet<(u32, u32)> = lb
            .installed
            .values()
            .map(|i| (i.id, i.generation))
            .collect();
        for table in [SlotTable::Weighted, SlotTable::Maglev] {
            for key in lb.maps.slot_keys(table).map_err(ApplyError::Read)? {
                let current = lb
                    .installed
                    .values()
                    .any(|i| i.id == key.svc_id && i.table() == table);
                if !current || !live.contains(&(key.svc_id, key.generation)) {
                    lb.maps
                        .delete_slot_key(table, &key)
                        .map_err(ApplyError::Read)?;
                }
            }
        }
        if !lb.installed.is_empty() {
            tracing::info!(
                services = lb.installed.len(),
                "took over the load balancer state pinned by a previous run"
            );
        }
        Ok(lb)
    }

    /// Reads the maps without changing them (for `lacewing maps services`).
    pub fn inspect(maps: LbMaps) -> Result<Self, ApplyError> {
        Ok(Self::read(maps)?.0)
    }

    /// The installed state as the maps hold it, and the ids of backends that
    /// belong to no service.
    fn read(maps: LbMaps) -> Result<(Self, Vec<u32>), ApplyError> {
        let services = maps.services().map_err(ApplyError::Read)?;
        let backends = maps.backends().map_err(ApplyError::Read)?;
        let mut by_service: HashMap<u32, Vec<(u32, Backend)>> = HashMap::new();
        for (id, b) in backends {
            by_service.entry(b.svc_id).or_default().push((id, b));
        }
        let mut installed = BTreeMap::new();
        let mut service_ids = IdPool::default();
        let mut backend_ids = IdPool::default();
        for (key, svc) in services {
            let Some(spec) = spec_from_maps(
                &key,
                &svc,
                by_service.get(&svc.id).map(Vec::as_slice).unwrap_or(&[]),
            ) else {
                continue;
            };
            service_ids.reserve(svc.id);
            let ids: BTreeMap<SocketAddr, u32> = by_service
                .remove(&svc.id)
                .unwrap_or_default()
                .into_iter()
                .map(|(id, b)| {
                    backend_ids.reserve(id);
                    (backend_addr(&b, key.family), id)
                })
                .collect();
            installed.insert(
                key,
                Installed {
                    spec,
                    id: svc.id,
                    generation: svc.generation,
                    count: svc.count,
                    flags: svc.flags,
                    inline: svc.slots,
                    backend_ids: ids,
                },
            );
        }
        let orphans = by_service
            .into_values()
            .flatten()
            .map(|(id, _)| id)
            .collect();
        Ok((
            Self {
                maps,
                routed: installed
                    .iter()
                    .filter(|(_, i)| i.flags & SVC_L7 != 0)
                    .map(|(k, _)| *k)
                    .collect(),
                installed,
                service_ids,
                backend_ids,
                // Read-only until `reconcile` sets the node's.
                maglev_capacity: u32::MAX,
            },
            orphans,
        ))
    }

    /// Makes the maps hold exactly `set`, touching only services that changed.
    pub fn apply(&mut self, set: &ServiceSet) -> Result<ApplyReport, ApplyError> {
        set.validate()?;
        let mut report = ApplyReport::default();
        let desired: BTreeMap<SvcKey, &ServiceEntry> =
            set.services.iter().map(|s| (s.key(), s)).collect();
        // Removals first: they cannot fail for lack of room, and they make room.
        let gone: Vec<SvcKey> = self
            .installed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            self.remove(&key)?;
            report.removed += 1;
        }
        for (key, entry) in &desired {
            match self.installed.get_mut(key) {
                Some(inst) if inst.spec.same_datapath(entry) => {
                    inst.spec.name.clone_from(&entry.name);
                    let flags = flags_of(&self.routed, key);
                    if inst.flags == flags {
                        report.unchanged += 1;
                    } else {
                        // Only the flags: the same slots, a new value.
                        let value = Service {
                            flags,
                            ..service_value(inst)
                        };
                        self.maps
                            .put_service(key, &value)
                            .map_err(|source| ApplyError::Map {
                                service: entry.name.clone(),
                                source,
                            })?;
                        inst.flags = flags;
                        report.updated += 1;
                    }
                }
                Some(_) => {
                    self.install(*key, &entry.normalized())?;
                    report.updated += 1;
                }
                None => {
                    self.install(*key, &entry.normalized())?;
                    report.added += 1;
                }
            }
        }
        Ok(report)
    }

    fn install(&mut self, key: SvcKey, entry: &ServiceEntry) -> Result<(), ApplyError> {
        let map_err = |source| ApplyError::Map {
            service: entry.name.clone(),
            source,
        };
        // Before any id is taken: a table that cannot fit changes nothing.
        if let Algorithm::Maglev { table_size } = entry.algorithm
            && !entry.backends.is_empty()
        {
            self.fits_maglev(entry, table_size as usize)?;
        }
        let old = self.installed.get(&key).cloned();
        let id = match &old {
            Some(o) => o.id,
            None => self
                .service_ids
                .take()
                .ok_or(ApplyError::Exhausted("service"))?,
        };
        let generation = old.as_ref().map_or(0, |o| 1 - o.generation);

        // 1. Backends: keep the ids of addresses already installed.
        let mut ids = BTreeMap::new();
        let mut fresh = Vec::new();
        for b in &entry.backends {
            let bid = match old.as_ref().and_then(|o| o.backend_ids.get(&b.addr)) {
                Some(&bid) => bid,
                None => {
                    let bid = self
                        .backend_ids
                        .take()
                        .ok_or(ApplyError::Exhausted("backend"))?;
                    fresh.push(bid);
                    bid
                }
            };
            ids.insert(b.addr, bid);
        }
        let slots = slot_layout(entry, &ids);
        let table = table_of(entry.algorithm, slots.len() as u32);
        let staged = (|| {
            for b in &entry.backends {
                self.maps.put_backend(ids[&b.addr], &backend_value(b, id))?;
            }
            // 2. Slots of the generation no reader uses.
            self.maps.put_slots(table, id, generation, &slots)
        })();
        if let Err(source) = staged {
            // Undo 1-2; the kernel never saw them.
            let _ = self.maps.delete_slots(table, id, generation);
            for bid in fresh {
                let _ = self.maps.delete_backend(bid);
                self.backend_ids.give(bid);
            }
            if old.is_none() {
                self.service_ids.give(id);
            }
            return Err(map_err(source));
        }
        // 3. Commit.
        let installed = Installed {
            spec: entry.clone(),
            id,
            generation,
            count: slots.len() as u32,
            flags: flags_of(&self.routed, &key),
            inline: inline_of(table, &slots),
            backend_ids: ids,
        };
        let value = service_value(&installed);
        self.maps.put_service(&key, &value).map_err(map_err)?;
        // 4. Old generation and unused backends.
        if let Some(o) = &old {
            self.maps
                .delete_slots(o.table(), id, o.generation)
                .map_err(map_err)?;
            for (addr, &bid) in &o.backend_ids {
                if !installed.backend_ids.contains_key(addr) {
                    self.maps.delete_backend(bid).map_err(map_err)?;
                    self.backend_ids.give(bid);
                }
            }
        }
        self.installed.insert(key, installed);
        Ok(())
    }

    /// Whether `entry`'s new Maglev table of `need` entries fits beside
    /// every table installed (its own previous one included: both live
    /// until the switch).
    fn fits_maglev(&self, entry: &ServiceEntry, need: usize) -> Result<(), ApplyError> {
        let used: u32 = self
            .installed
            .values()
            .filter(|i| i.table() == SlotTable::Maglev)
            .map(|i| i.count)
            .sum();
        if u64::from(used) + need as u64 > u64::from(self.maglev_capacity) {
            return Err(ApplyError::MaglevFull {
                service: entry.name.clone(),
                need,
                used,
                capacity: self.maglev_capacity,
            });
        }
        Ok(())
    }

    /// Deletes the session-affinity entries the kernel would no longer use:
    /// older than their service's timeout, or of a service that is gone or
    /// has affinity off. `now_ns` is `CLOCK_MONOTONIC`, the kernel's stamp.
    /// How many went.
    pub fn sweep_affinity(&mut self, now_ns: u64) -> Result<usize, MapOpError> {
        let timeouts: HashMap<u32, u64> = self
            .installed
            .values()
            .filter(|i| i.spec.affinity_timeout_s > 0)
            .map(|i| (i.id, u64::from(i.spec.affinity_timeout_s) * 1_000_000_000))
            .collect();
        self.maps.sweep_affinity(|svc_id, entry| {
            timeouts
                .get(&svc_id)
                .is_none_or(|&timeout| now_ns.saturating_sub(entry.last_used_ns) >= timeout)
        })
    }

    /// Sets which frontends have HTTP routes; the next [`apply`](Self::apply)
    /// writes the change.
    pub fn set_routed(&mut self, routed: BTreeSet<SvcKey>) {
        self.routed = routed;
    }

    fn remove(&mut self, key: &SvcKey) -> Result<(), ApplyError> {
        let Some(old) = self.installed.get(key).cloned() else {
            return Ok(());
        };
        let map_err = |source| ApplyError::Map {
            service: old.spec.name.clone(),
            source,
        };
        // The service entry goes first: no new reader reaches the slots.
        self.maps.delete_service(key).map_err(map_err)?;
        self.installed.remove(key);
        self.maps
            .delete_slots(old.table(), old.id, old.generation)
            .map_err(map_err)?;
        for &bid in old.backend_ids.values() {
            self.maps.delete_backend(bid).map_err(map_err)?;
            self.backend_ids.give(bid);
        }
        self.maps.delete_stats(old.id).map_err(map_err)?;
        self.service_ids.give(old.id);
        Ok(())
    }

    /// Counters of every installed service.
    pub fn stats(&self) -> Result<Vec<ServiceStats>, MapOpError> {
        self.installed
            .values()
            .map(|i| {
                Ok(ServiceStats {
                    name: i.spec.name.clone(),
                    frontend: i.spec.frontend,
                    protocol: i.spec.protocol,
                    backends: i.spec.backends.len(),
                    stats: self.maps.stats(i.id)?,
                })
            })
            .collect()
    }

    /// Every installed service with its backends and counters, for people.
    pub fn describe(&self) -> Result<Vec<ServiceView>, MapOpError> {
        self.installed.values().map(|i| self.view(i)).collect()
    }

    /// The TCP service at `frontend`, if one is installed.
    pub fn service_at(&self, frontend: SocketAddr) -> Result<Option<ServiceView>, MapOpError> {
        self.installed
            .get(&lacewing_core::model::services::svc_key(
                frontend,
                Protocol::Tcp,
            ))
            .map(|i| self.view(i))
            .transpose()
    }

    /// The frontend of the TCP port `port` (its number or name) of
    /// Service `namespace/name`.
    pub fn frontend_of(&self, service: &str, port: &str) -> Option<SocketAddr> {
        self.installed
            .values()
            .filter(|i| i.spec.protocol == Protocol::Tcp)
            .find(|i| {
                i.spec.name == format!("{service}:{port}")
                    || i.spec.service_port().is_some_and(|((ns, name), number)| {
                        format!("{ns}/{name}") == service && port.parse() == Ok(number)
                    })
            })
            .map(|i| i.spec.frontend)
    }

    fn view(&self, i: &Installed) -> Result<ServiceView, MapOpError> {
        Ok(ServiceView {
            name: i.spec.service_port().map_or_else(
                || i.spec.name.clone(),
                |((ns, name), port)| format!("{ns}/{name}:{port}"),
            ),
            frontend: i.spec.frontend,
            protocol: i.spec.protocol,
            algorithm: match i.spec.algorithm {
                Algorithm::Random => "random".to_owned(),
                Algorithm::Maglev { table_size } => format!("maglev/{table_size}"),
            },
            affinity_timeout_s: i.spec.affinity_timeout_s,
            backends: i
                .spec
                .backends
                .iter()
                .map(|b| {
                    if b.weight == 1 {
                        b.addr.to_string()
                    } else {
                        format!("{}*{}", b.addr, b.weight)
                    }
                })
                .collect(),
            stats: self.maps.stats(i.id)?,
        })
    }

    /// Connects to an address in these CIDRs that is no service are refused.
    pub fn set_service_cidrs(&mut self, cidrs: &[ServiceCidr]) -> Result<(), MapOpError> {
        let entries: Vec<(u8, [u8; 16], u8)> = cidrs
            .iter()
            .map(|c| {
                let mut addr = [0u8; 16];
                let family = match c.addr {
                    IpAddr::V4(ip) => {
                        addr[..4].copy_from_slice(&ip.octets());
                        mesh_common::family::INET as u8
                    }
                    IpAddr::V6(ip) => {
                        addr.copy_from_slice(&ip.octets());
                        mesh_common::family::INET6 as u8
                    }
                };
                (family, addr, c.prefix)
            })
            .collect();
        self.maps.set_service_cidrs(&entries)
    }

    pub fn service_count(&self) -> usize {
        self.installed.len()
    }
}

/// The backend id of each slot: weighted random repeats each backend by its
/// weight (divided by the weights' gcd); Maglev fills its table.
fn slot_layout(entry: &ServiceEntry, ids: &BTreeMap<SocketAddr, u32>) -> Vec<u32> {
    match entry.algorithm {
        Algorithm::Random => {
            let g = entry
                .backends
                .iter()
                .fold(0u16, |g, b| gcd(g, b.weight))
                .max(1);
            entry
                .backends
                .iter()
                .flat_map(|b| std::iter::repeat_n(ids[&b.addr], usize::from(b.weight / g)))
                .collect()
        }
        Algorithm::Maglev { table_size } => {
            let names: Vec<String> = entry.backends.iter().map(|b| b.addr.to_string()).collect();
            let refs: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
            maglev::build_table(&refs, table_size)
                .into_iter()
                .map(|i| ids[&entry.backends[i as usize].addr])
                .collect()
        }
    }
}

fn gcd(a: u16, b: u16) -> u16 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `Service.slots` for a service whose slots are `slots`.
fn inline_of(table: SlotTable, slots: &[u32]) -> [u32; INLINE_SLOTS] {
    let mut inline = [0; INLINE_SLOTS];
    if table == SlotTable::Inline {
        inline[..slots.len()].copy_from_slice(slots);
    }
    inline
}

/// Where a service's `count` slots live.
fn table_of(algorithm: Algorithm, count: u32) -> SlotTable {
    match algorithm {
        Algorithm::Random if inline_slots(ALG_RANDOM, count) => SlotTable::Inline,
        Algorithm::Random => SlotTable::Weighted,
        Algorithm::Maglev { .. } => SlotTable::Maglev,
    }
}

fn backend_value(b: &BackendEntry, svc_id: u32) -> Backend {
    let mut addr = [0u8; 16];
    match b.addr.ip() {
        IpAddr::V4(ip) => addr[..4].copy_from_slice(&ip.octets()),
        IpAddr::V6(ip) => addr.copy_from_slice(&ip.octets()),
    }
    Backend {
        addr,
        port: b.addr.port(),
        weight: b.weight,
        svc_id,
    }
}

fn backend_addr(b: &Backend, family: u8) -> SocketAddr {
    SocketAddr::new(ip_from(&b.addr, family), b.port)
}

fn ip_from(addr: &[u8; 16], family: u8) -> IpAddr {
    if u16::from(family) == mesh_common::family::INET {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

/// A service spec read back from the maps (the name is unknown until the next
/// apply supplies it).
fn spec_from_maps(
    key: &SvcKey,
    svc: &Service,
    backends: &[(u32, Backend)],
) -> Option<ServiceEntry> {
    let protocol = Protocol::from_number(key.proto)?;
    let frontend = SocketAddr::new(ip_from(&key.addr, key.family), key.port);
    let algorithm = if svc.algorithm == ALG_MAGLEV {
        Algorithm::Maglev {
            table_size: svc.count,
        }
    } else {
        Algorithm::Random
    };
    let mut list: Vec<BackendEntry> = backends
        .iter()
        .map(|(_, b)| BackendEntry {
            addr: backend_addr(b, key.family),
            weight: b.weight,
        })
        .collect();
    list.sort();
    Some(ServiceEntry {
        name: format!("{frontend}/{protocol}"),
        frontend,
        protocol,
        algorithm,
        affinity_timeout_s: svc.affinity_timeout_s,
        backends: list,
        // The maps do not hold it (the kernel has no use for it).
        app_protocol: Default::default(),
    })
}

/// The kernel's value of an installed service.
fn service_value(i: &Installed) -> Service {
    Service {
        slots: i.inline,
        id: i.id,
        count: i.count,
        generation: i.generation,
        algorithm: match i.spec.algorithm {
            Algorithm::Random => ALG_RANDOM,
            Algorithm::Maglev { .. } => ALG_MAGLEV,
        },
        affinity_timeout_s: i.spec.affinity_timeout_s,
        flags: i.flags,
    }
}

fn flags_of(routed: &BTreeSet<SvcKey>, key: &SvcKey) -> u32 {
    if routed.contains(key) { SVC_L7 } else { 0 }
}

/// Ids from 1 up, reusing freed ones first.
#[derive(Debug, Default)]
struct IdPool {
    used: BTreeSet<u32>,
    free: Vec<u32>,
    next: u32,
}

impl IdPool {
    fn reserve(&mut self, id: u32) {
        self.used.insert(id);
        self.next = self.next.max(id);
    }
    fn take(&mut self) -> Option<u32> {
        while let Some(id) = self.free.pop() {
            if self.used.insert(id) {
                return Some(id);
            }
        }
        loop {
            self.next = self.next.checked_add(1)?;
            if self.used.insert(self.next) {
                return Some(self.next);
            }
        }
    }
    fn give(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.free.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(weights: &[u16], algorithm: Algorithm) -> ServiceEntry {
        ServiceEntry {
            name: "default/web:http".into(),
            frontend: "10.96.0.10:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            algorithm,
            affinity_timeout_s: 0,
            app_protocol: Default::default(),
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| BackendEntry {
                    addr: format!("10.244.1.{}:8080", 10 + i).parse().unwrap(),
                    weight: w,
                })
                .collect(),
        }
    }

    fn ids(e: &ServiceEntry) -> BTreeMap<SocketAddr, u32> {
        e.backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.addr, i as u32 + 1))
            .collect()
    }

    #[test]
    fn weighted_slots_repeat_backends_by_reduced_weight() {
        let e = entry(&[10, 20, 10], Algorithm::Random);
        assert_eq!(slot_layout(&e, &ids(&e)), vec![1, 2, 2, 3]);
        let e = entry(&[1, 1, 1], Algorithm::Random);
        assert_eq!(slot_layout(&e, &ids(&e)), vec![1, 2, 3]);
        let e = entry(&[], Algorithm::Random);
        assert!(
            slot_layout(&e, &ids(&e)).is_empty(),
            "no backend: no slot, connects refused"
        );
    }

    #[test]
    fn maglev_slots_fill_the_whole_table() {
        let e = entry(&[1, 1, 1, 1, 1], Algorithm::Maglev { table_size: 251 });
        let slots = slot_layout(&e, &ids(&e));
        assert_eq!(slots.len(), 251);
        assert!((1..=5).all(|id| slots.contains(&id)));
    }

    #[test]
    fn ids_are_reused_after_release() {
        let mut pool = IdPool::default();
        pool.reserve(3);
        assert_eq!((pool.take(), pool.take()), (Some(4), Some(5)));
        pool.give(4);
        assert_eq!(pool.take(), Some(4));
    }
}
