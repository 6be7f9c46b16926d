//! Large updates travel in pieces: [`split`] on the controller, [`assemble`]
//! on the node. Both sides live here so they cannot drift apart.

use super::pb;

/// A piece that does not belong to the update being gathered: the stream is
/// out of order and must be restarted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a piece of version {piece} arrived inside version {update}: reconnect to get a whole update"
)]
pub struct ChunkError {
    pub piece: u64,
    pub update: u64,
}

/// Gathers the pieces of a chunked update; the whole update once its last
/// piece has arrived.
pub fn assemble(
    pending: &mut Option<pb::ConfigUpdate>,
    piece: pb::ConfigUpdate,
) -> Result<Option<pb::ConfigUpdate>, ChunkError> {
    let update = match pending.take() {
        Some(mut head) => {
            if head.version != piece.version {
                return Err(ChunkError {
                    piece: piece.version,
                    update: head.version,
                });
            }
            head.upserts.extend(piece.upserts);
            head.removes.extend(piece.removes);
            head.workload_upserts.extend(piece.workload_upserts);
            head.workload_removes.extend(piece.workload_removes);
            head.peer_upserts.extend(piece.peer_upserts);
            head.peer_removes.extend(piece.peer_removes);
            head.policies_replaced |= piece.policies_replaced;
            head.policies.extend(piece.policies);
            head.routes_replaced |= piece.routes_replaced;
            head.routes.extend(piece.routes);
            head.traffic_replaced |= piece.traffic_replaced;
            head.traffic_policies.extend(piece.traffic_policies);
            head.partial = piece.partial;
            head
        }
        None => piece,
    };
    if update.partial {
        *pending = Some(update);
        Ok(None)
    } else {
        Ok(Some(update))
    }
}

/// Services per message: a full snapshot of a large cluster goes out in
/// pieces, so no stream ever holds the whole set in its buffers.
pub const SERVICES_PER_MESSAGE: usize = 256;

/// Splits an update into messages of at most [`SERVICES_PER_MESSAGE`]
/// services; every one but the last is marked `partial`. Removals and the
/// node's workloads (a few dozen) ride in the last.
pub fn split(mut update: pb::ConfigUpdate) -> Vec<pb::ConfigUpdate> {
    if update.upserts.len() <= SERVICES_PER_MESSAGE {
        return vec![update];
    }
    let mut out = Vec::new();
    let rest = std::mem::take(&mut update.upserts);
    let mut pieces = rest.chunks(SERVICES_PER_MESSAGE).peekable();
    while let Some(piece) = pieces.next() {
        let last = pieces.peek().is_none();
        out.push(pb::ConfigUpdate {
            version: update.version,
            base_version: update.base_version,
            upserts: piece.to_vec(),
            removes: if last {
                std::mem::take(&mut update.removes)
            } else {
                Vec::new()
            },
            workload_upserts: if last {
                std::mem::take(&mut update.workload_upserts)
            } else {
                Vec::new()
            },
            workload_removes: if last {
                std::mem::take(&mut update.workload_removes)
            } else {
                Vec::new()
            },
            peer_upserts: if last {
                std::mem::take(&mut update.peer_upserts)
            } else {
                Vec::new()
            },
            peer_removes: if last {
                std::mem::take(&mut update.peer_removes)
            } else {
                Vec::new()
            },
            policies_replaced: last && update.policies_replaced,
            policies: if last {
                std::mem::take(&mut update.policies)
            } else {
                Vec::new()
            },
            routes_replaced: last && update.routes_replaced,
            routes: if last {
                std::mem::take(&mut update.routes)
            } else {
                Vec::new()
            },
            traffic_replaced: last && update.traffic_replaced,
            traffic_policies: if last {
                std::mem::take(&mut update.traffic_policies)
            } else {
                Vec::new()
            },
            partial: !last,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_update_goes_in_pieces_that_reassemble_to_it() {
        let service = |i: u32| pb::Service {
            name: format!("s{i}"),
            ..Default::default()
        };
        let update = pb::ConfigUpdate {
            version: 7,
            base_version: 0,
            upserts: (0..600).map(service).collect(),
            removes: vec![pb::ServiceKey::default()],
            workload_upserts: vec![pb::Workload::default()],
            workload_removes: vec!["shop/gone".into()],
            peer_upserts: vec![pb::Peer::default()],
            peer_removes: vec![vec![10, 244, 0, 9]],
            policies_replaced: true,
            policies: vec![pb::Policy::default()],
            routes_replaced: true,
            routes: vec![pb::Route::default()],
            traffic_replaced: true,
            traffic_policies: vec![pb::TrafficPolicy::default()],
            partial: false,
        };
        let pieces = split(update.clone());
        assert_eq!(pieces.len(), 3);
        assert!(
            pieces[..2]
                .iter()
                .all(|p| p.partial && p.removes.is_empty())
        );
        let mut pending = None;
        let mut whole = None;
        for p in pieces {
            whole = assemble(&mut pending, p).unwrap();
        }
        assert_eq!(whole, Some(update));
        assert_eq!(
            split(pb::ConfigUpdate {
                upserts: vec![service(1)],
                ..Default::default()
            })
            .len(),
            1
        );
    }
}
