//! What the stable replay tests share: the checked-in corpus of a target
//! and seeded random inputs.

use std::path::PathBuf;

use crate::Rng;

/// The corpus directory of `target` (`corpus/<target>` in this package).
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Every input of `target`'s checked-in corpus, with its file name, sorted.
///
/// # Panics
///
/// When the directory cannot be read or is empty: a replay test over no
/// input would prove nothing.
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| {
            let p = e.expect("corpus entry").path();
            let name = p.file_name().unwrap_or_default().to_string_lossy().into();
            (name, std::fs::read(&p).expect("corpus file"))
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {} is empty", dir.display());
    out
}

/// `count` random inputs of up to `max_len` bytes from `seed`, the same on
/// every run.
pub fn seeded(seed: u64, count: usize, max_len: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let len = (rng.next_u64() % (max_len as u64 + 1)) as usize;
            rng.bytes(len)
        })
        .collect()
}

/// Run `target` on every input, naming the failing one: the panic is
/// caught, reported with the input's name and bytes, and raised again.
pub fn run_all(target: fn(&[u8]), inputs: &[(String, Vec<u8>)]) {
    for (name, data) in inputs {
        if let Err(p) = std::panic::catch_unwind(|| target(data)) {
            eprintln!(
                "fuzz input {name} ({} bytes) failed: {data:02x?}",
                data.len()
            );
            std::panic::resume_unwind(p);
        }
    }
}
