//! `lab-guest`: the in-VM runner. Started by the initramfs' `/init` as
//! `chroot /host lab-guest --manifest <path>`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use vdpa_integration::guest;
use vdpa_integration::manifest::Manifest;

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            println!("lab-guest: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<u64> {
    let mut args = std::env::args().skip(1);
    let manifest = match (args.next().as_deref(), args.next()) {
        (Some("--manifest"), Some(p)) => PathBuf::from(p),
        // A case's unprivileged child (cases::handed), started by the lab.
        (Some(guest::cases::handed::CHILD_ARG), Some(spec)) => {
            guest::cases::handed::child(&spec)?;
            return Ok(0);
        }
        _ => anyhow::bail!("usage: lab-guest --manifest <path>"),
    };
    let manifest = Manifest::load(&manifest).context("load the manifest")?;
    let bindings = guest::bind_all(&manifest);
    for (v, r) in &bindings {
        if let Err(e) = r {
            println!("lab-guest: binding {} to vfio-pci failed: {e}", v.name());
        }
    }
    let mut suite = guest::cases::cases(&manifest);
    if let Some(only) = &manifest.only {
        let left_out = suite.retain_named(only);
        println!(
            "lab-guest: VDPA_LAB_CASES={only}: running {} of {} cases",
            suite.len(),
            suite.len() + left_out
        );
    }
    Ok(guest::run(&manifest, &bindings, &suite))
}
