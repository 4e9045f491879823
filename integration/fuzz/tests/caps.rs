//! Replay of target `caps`: the checked-in corpus, then seeded random
//! inputs (the same on every run).

use vdpa_fuzz::replay;

#[test]
fn caps_corpus_replays_without_violating_an_invariant() {
    replay::run_all(vdpa_fuzz::caps::run, &replay::corpus("caps"));
}

#[test]
fn caps_seeded_random_inputs_violate_no_invariant() {
    let inputs: Vec<(String, Vec<u8>)> = replay::seeded(SEED, 2000, 400)
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("seed {SEED:#x} #{i}"), d))
        .collect();
    replay::run_all(vdpa_fuzz::caps::run, &inputs);
}

const SEED: u64 = 0xcafe;
