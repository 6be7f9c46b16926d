//! The controller-node protocol as a node takes it: pieces of one update
//! (protobuf, each prefixed by its length in one byte) decoded, reassembled,
//! and every part of the whole update turned into the model, as the node
//! does before applying a delta to its state; the services it would apply
//! checked as the node checks them, and their Maglev tables planned.
#![no_main]

use lacewing_core::{
    model::services::{Algorithm, ServiceEntry, ServiceSet},
    proto::{self, chunks, pb},
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let mut pending = None;
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (piece, tail) = tail.split_at(len);
        rest = tail;
        let Ok(piece) = pb::ConfigUpdate::decode(piece) else {
            return;
        };
        let Ok(Some(update)) = chunks::assemble(&mut pending, piece) else {
            continue;
        };
        apply(&update);
    }
});

fn apply(update: &pb::ConfigUpdate) {
    let services: Result<Vec<ServiceEntry>, _> =
        update.upserts.iter().map(ServiceEntry::try_from).collect();
    if let Ok(services) = services {
        let set = ServiceSet { services };
        if set.validate().is_ok() {
            for s in &set.services {
                plan(s);
            }
        }
    }
    for key in &update.removes {
        let _ = proto::key_from(key);
    }
    for w in &update.workload_upserts {
        if let Ok(w) = proto::workload_from(w, "n1") {
            assert_eq!(w.node, "n1");
        }
    }
    for a in &update.peer_removes {
        let _ = proto::address_from(a);
    }
    for p in &update.peer_upserts {
        if let Ok((address, peer)) = proto::peer_from(p) {
            // What the node sends back out is what it read.
            assert_eq!(
                proto::peer_from(&proto::peer_of(address, &peer)).ok(),
                Some((address, peer))
            );
        }
    }
    for p in &update.policies {
        let _ = proto::policy_from(p);
    }
    for r in &update.routes {
        let _ = proto::route_from(r);
    }
    for t in &update.traffic_policies {
        let _ = proto::traffic_from(t);
    }
}

/// The Maglev table of a service the node accepted, as its planner builds
/// it: every entry names one of the backends.
fn plan(s: &ServiceEntry) {
    let Algorithm::Maglev { table_size } = s.algorithm else {
        return;
    };
    let names: Vec<String> = s.backends.iter().map(|b| b.addr.to_string()).collect();
    let refs: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
    let table = mesh_common::maglev::build_table(&refs, table_size);
    assert!(table.iter().all(|&i| (i as usize) < s.backends.len()));
}
