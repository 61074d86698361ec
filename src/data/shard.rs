//! Which subjects each rank reads: one permutation per epoch that depends only on (seed, epoch),
//! never on the world size, cut into per-rank parts by index arithmetic. So 1 rank and N ranks
//! visit the same global order, and a resumed run needs no generator state.
use anyhow::{Result, bail};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// Domain tag mixed into the generator seed, so other streams seeded from the same
/// (seed, epoch) never coincide with this one.
const PURPOSE: &[u8; 16] = b"mtx-epoch-perm01";

/// The order of `n` subjects in `epoch`: Fisher-Yates with ChaCha8 seeded from (seed, epoch).
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..].copy_from_slice(PURPOSE);
    let mut rng = ChaCha8Rng::from_seed(key);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

/// Unbiased integer in [0, bound) by rejection: our own few lines rather than rand's range
/// sampling, whose exact stream may change between rand versions.
fn uniform_below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    let zone = u64::MAX - (u64::MAX % bound);
    loop {
        let v = rng.next_u64();
        if v < zone {
            return v % bound;
        }
    }
}

fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 {
        bail!("world size is 0");
    }
    if rank >= world {
        bail!("rank {rank} is not below the world size {world}");
    }
    Ok(())
}

/// A full epoch without batching: rank r takes positions r, r + world, r + 2 world... of the
/// epoch's permutation, so every subject is read by exactly one rank.
pub fn rank_epoch_subjects(
    n: usize,
    seed: u64,
    epoch: u64,
    rank: usize,
    world: usize,
) -> Result<Vec<usize>> {
    check_rank(rank, world)?;
    Ok(epoch_permutation(n, seed, epoch)
        .into_iter()
        .skip(rank)
        .step_by(world)
        .collect())
}

/// Per-rank batch size: the global batch split into `world` equal parts.
pub fn per_rank_batch(global_batch: usize, world: usize) -> Result<usize> {
    if world == 0 {
        bail!("world size is 0");
    }
    if global_batch % world != 0 {
        bail!("global batch {global_batch} is not divisible by the {world} ranks");
    }
    let per = global_batch / world;
    if per == 0 {
        bail!("global batch {global_batch} gives 0 subjects per rank for {world} ranks");
    }
    Ok(per)
}

/// Rank `rank`'s part of every full global batch of the epoch: batch b covers permutation
/// positions [b B, (b + 1) B), and rank r takes the contiguous part [r B/world, (r + 1) B/world)
/// of it. The last partial batch is dropped (all ranks must step together).
pub fn rank_batches(
    n: usize,
    seed: u64,
    epoch: u64,
    rank: usize,
    world: usize,
    global_batch: usize,
) -> Result<Vec<Vec<usize>>> {
    check_rank(rank, world)?;
    let per = per_rank_batch(global_batch, world)?;
    let perm = epoch_permutation(n, seed, epoch);
    Ok(perm
        .chunks_exact(global_batch)
        .map(|batch| batch[rank * per..(rank + 1) * per].to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation() {
        for n in [0, 1, 2, 17, 100] {
            let mut p = epoch_permutation(n, 3, 1);
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn bad_world_or_batch_is_an_error() {
        assert!(rank_epoch_subjects(10, 0, 0, 2, 2).is_err());
        assert!(per_rank_batch(10, 3).is_err());
        assert!(per_rank_batch(0, 3).is_err());
        assert!(rank_batches(10, 0, 0, 0, 0, 4).is_err());
    }
}
