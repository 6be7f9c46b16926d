//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table
//! built in userspace. Removing one of N backends moves about 1/N of the
//! table's entries, so about 1/N of new flows change backend.

extern crate alloc;

use alloc::vec::Vec;

use crate::lb::mix64;

/// Builds a Maglev table of `size` entries (a prime) over backends named by
/// stable byte strings (their address and port), returning for each entry the
/// index into `backends`. Empty when there are no backends.
pub fn build_table(backends: &[&[u8]], size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    // Each backend walks its own permutation of the table: offset + j * skip.
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|name| {
            let offset = hash_bytes(name, 0x6d61_676c_6576_0001) % m;
            let skip = hash_bytes(name, 0x6d61_676c_6576_0002) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = alloc::vec![0u64; n];
    let mut table = alloc::vec![u32::MAX; size as usize];
    let mut filled = 0u32;
    'fill: loop {
        for (i, &(offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while table[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

/// Whether `n` is prime (Maglev needs a prime table size so every skip
/// visits every entry).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    bytes
        .iter()
        .fold(mix64(seed), |h, &b| mix64(h ^ u64::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::maglev_index;

    fn names(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| alloc::format!("10.244.1.{}:8080", 10 + i).into_bytes())
            .collect()
    }

    fn lookup(table: &[u32], flow: u64) -> u32 {
        table[maglev_index(flow, 7, table.len() as u32) as usize]
    }

    #[test]
    fn every_entry_is_filled_evenly() {
        let owned = names(5);
        let refs: Vec<&[u8]> = owned.iter().map(|v| v.as_slice()).collect();
        let table = build_table(&refs, 16381);
        let mut counts = [0u32; 5];
        for &b in &table {
            counts[b as usize] += 1;
        }
        for c in counts {
            assert!((3200..=3350).contains(&c), "uneven table: {counts:?}");
        }
    }

    #[test]
    fn removing_one_of_five_backends_moves_about_a_fifth_of_flows() {
        let owned = names(5);
        let all: Vec<&[u8]> = owned.iter().map(|v| v.as_slice()).collect();
        let without: Vec<&[u8]> = all.iter().copied().filter(|n| *n != all[2]).collect();
        let before = build_table(&all, 16381);
        let after = build_table(&without, 16381);
        let flows: Vec<u64> = (0..10_000u64).map(|i| mix64(i * 7919)).collect();
        let name_before = |f: u64| all[lookup(&before, f) as usize];
        let name_after = |f: u64| without[lookup(&after, f) as usize];
        let moved = flows
            .iter()
            .filter(|&&f| name_before(f) != name_after(f))
            .count();
        // 1/5 must move (the removed backend's flows); Maglev adds little more.
        assert!(
            (1_900..=2_500).contains(&moved),
            "{moved} of 10000 flows moved"
        );
        let restored = build_table(&all, 16381);
        assert_eq!(
            restored, before,
            "adding the backend back restores every flow"
        );
    }

    #[test]
    fn primes() {
        assert!(is_prime(16381) && is_prime(65521) && is_prime(251));
        assert!(!is_prime(16383) && !is_prime(1) && !is_prime(65536));
    }
}
