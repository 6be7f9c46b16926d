//! The map-update planner's Maglev table: any set of backend names and a
//! table size from those the node uses; every entry must name a backend.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::maglev::build_table;

/// Primes, as the node sizes its tables (small ones keep runs fast).
const SIZES: [u32; 4] = [7, 251, 1021, 16381];

fuzz_target!(|data: &[u8]| {
    let Some((&size, names)) = data.split_first() else {
        return;
    };
    let size = SIZES[usize::from(size) % SIZES.len()];
    let backends: Vec<&[u8]> = names.chunks(6).collect();
    let table = build_table(&backends, size);
    if backends.is_empty() {
        assert!(table.is_empty());
        return;
    }
    assert_eq!(table.len(), size as usize);
    assert!(table.iter().all(|&i| (i as usize) < backends.len()));
});
