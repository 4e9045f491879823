//! Replay of target `ops`: the checked-in corpus, then seeded random
//! inputs (the same on every run). The target counts the process's file
//! descriptors and named threads, so the tests of this file run one at a
//! time (and no other target's tests share this process).

use vdpa_fuzz::replay;

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn ops_corpus_replays_without_violating_an_invariant() {
    let _serial = serial();
    replay::run_all(vdpa_fuzz::ops::run, &replay::corpus("ops"));
}

#[test]
fn ops_seeded_random_inputs_violate_no_invariant() {
    let _serial = serial();
    let inputs: Vec<(String, Vec<u8>)> = replay::seeded(SEED, 150, 120)
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("seed {SEED:#x} #{i}"), d))
        .collect();
    replay::run_all(vdpa_fuzz::ops::run, &inputs);
}

const SEED: u64 = 0x0b5;
