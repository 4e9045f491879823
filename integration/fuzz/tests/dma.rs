//! Replay of target `dma`: the checked-in corpus, then seeded random
//! inputs (the same on every run).

use vdpa_fuzz::replay;

#[test]
fn dma_corpus_replays_without_violating_an_invariant() {
    replay::run_all(vdpa_fuzz::dma::run, &replay::corpus("dma"));
}

#[test]
fn dma_seeded_random_inputs_violate_no_invariant() {
    let inputs: Vec<(String, Vec<u8>)> = replay::seeded(SEED, 2000, 400)
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("seed {SEED:#x} #{i}"), d))
        .collect();
    replay::run_all(vdpa_fuzz::dma::run, &inputs);
}

const SEED: u64 = 0xd3a;
