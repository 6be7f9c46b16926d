//! The node's side of same-node acceleration (see `mesh_common::splice`):
//! the maps through which the proxy's watches ([`lacewing_proxy::splice`])
//! switch a spliced writer back to plain TCP when the daemon falls behind.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, SockHash};
use lacewing_proxy::splice::{SplicedWriters, Watch};
use mesh_common::{
    names,
    splice::{SpliceKey, writer_key},
};
use prometheus_client::metrics::counter::Counter;

use super::maps::open;

/// `LW_SPLICE_OFF` and `LW_SPLICE`, and a count of the writers the daemon
/// switched off.
pub struct SpliceOff {
    maps: Mutex<OffMaps>,
    pub switched_off: Counter,
}

/// `LW_SPLICE_OFF` and `LW_SPLICE`, written together.
struct OffMaps {
    off: BpfHashMap<MapData, SpliceKey, u8>,
    writers: SockHash<MapData, SpliceKey>,
}

impl SpliceOff {
    pub fn open(root: &Path) -> Result<Self, MapError> {
        Ok(Self {
            maps: Mutex::new(OffMaps {
                off: BpfHashMap::try_from(open(root, names::MAP_SPLICE_OFF)?)?,
                writers: SockHash::try_from(open(root, names::MAP_SPLICE)?)?,
            }),
            switched_off: Counter::default(),
        })
    }
}

impl SplicedWriters for SpliceOff {
    /// Switches the writer off, then takes it out of `LW_SPLICE`: its
    /// writes then skip the sk_msg program too (plain TCP, full speed).
    /// Nothing is ever moved into a writer, so leaving loses nothing.
    fn switch_off(&self, key: &SpliceKey) {
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        let OffMaps { off, writers } = &mut *maps;
        match off.insert(key, 1, 0) {
            Ok(()) => {
                self.switched_off.inc();
                // Already gone if it half-closed or closed: then nothing
                // runs on its writes any more, and the kernel may have
                // dropped its marks (at close) before this one was made,
                // so it goes here, or it would stay for good.
                if writers.remove(key).is_err() {
                    let _ = off.remove(key);
                }
            }
            Err(err) => tracing::warn!(%err, "switching a spliced writer off"),
        }
    }
}

/// The watch on the writer at the other end of the daemon's `socket`
/// (`netns`: the namespace's cookie, for loopback hops); none without
/// acceleration maps or when the socket has no addresses any more.
pub fn watch(
    off: Option<&Arc<SpliceOff>>,
    socket: &tokio::net::TcpStream,
    netns: u64,
) -> Option<Arc<Watch>> {
    let (local, peer) = (socket.local_addr().ok()?, socket.peer_addr().ok()?);
    let off: Arc<dyn SplicedWriters> = Arc::clone(off?) as Arc<dyn SplicedWriters>;
    Some(Watch::new(writer_key(local, peer, netns), off))
}
