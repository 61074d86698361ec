//! Sharding: every subject exactly once per epoch across ranks, the same global order for
//! every world size, a new order each epoch, the same order for the same seed.
use mtx_hpc::data::shard::{epoch_permutation, per_rank_batch, rank_batches, rank_epoch_subjects};

#[test]
fn every_subject_exactly_once_per_epoch_for_world_sizes_1_to_5() {
    for n in [1, 7, 23, 40] {
        for world in 1..=5 {
            for epoch in 0..3 {
                let mut seen = vec![0u32; n];
                for rank in 0..world {
                    for i in rank_epoch_subjects(n, 11, epoch, rank, world).expect("shard") {
                        seen[i] += 1;
                    }
                }
                assert!(
                    seen.iter().all(|&c| c == 1),
                    "n {n} world {world} epoch {epoch}: {seen:?}"
                );
            }
        }
    }
}

#[test]
fn interleaving_the_ranks_gives_the_same_global_order_for_every_world_size() {
    let n = 23;
    let reference = epoch_permutation(n, 11, 4);
    for world in 1..=5 {
        let parts: Vec<Vec<usize>> = (0..world)
            .map(|r| rank_epoch_subjects(n, 11, 4, r, world).expect("shard"))
            .collect();
        let mut order = Vec::new();
        for k in 0..n.div_ceil(world) {
            for p in &parts {
                if let Some(&i) = p.get(k) {
                    order.push(i);
                }
            }
        }
        assert_eq!(order, reference, "world {world}");
    }
}

#[test]
fn batches_cover_all_full_batches_in_the_same_order_for_every_world_size() {
    let (n, global) = (50, 12);
    let full = n / global * global;
    let perm = epoch_permutation(n, 3, 2);
    for world in [1, 2, 3, 4, 6] {
        let per = per_rank_batch(global, world).expect("divisible");
        let by_rank: Vec<Vec<Vec<usize>>> = (0..world)
            .map(|r| rank_batches(n, 3, 2, r, world, global).expect("batches"))
            .collect();
        let mut order: Vec<usize> = Vec::new();
        for b in 0..n / global {
            for rank_batches in &by_rank {
                assert_eq!(rank_batches[b].len(), per);
                order.extend(&rank_batches[b]);
            }
        }
        assert_eq!(order, perm[..full].to_vec(), "world {world}");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), full, "a subject appears twice in one epoch");
    }
    let err = rank_batches(n, 3, 2, 0, 5, global).expect_err("12 over 5 ranks");
    assert!(err.to_string().contains("not divisible"), "{err}");
    let err = per_rank_batch(2, 4).expect_err("2 over 4 ranks");
    assert!(err.to_string().contains("not divisible"), "{err}");
}

#[test]
fn order_changes_with_epoch_and_seed_and_repeats_for_the_same_seed() {
    let n = 100;
    assert_eq!(epoch_permutation(n, 9, 1), epoch_permutation(n, 9, 1));
    assert_ne!(epoch_permutation(n, 9, 1), epoch_permutation(n, 9, 2));
    assert_ne!(epoch_permutation(n, 9, 1), epoch_permutation(n, 10, 1));
    assert_ne!(epoch_permutation(n, 9, 0), (0..n).collect::<Vec<_>>());
    // Pinned values: the order must not change silently between versions (resume relies on it).
    assert_eq!(epoch_permutation(8, 0, 0), vec![6, 4, 2, 3, 7, 5, 1, 0]);
}
