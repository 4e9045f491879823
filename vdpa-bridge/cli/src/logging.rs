//! The command's logger: `env_logger`, driven by `RUST_LOG` as usual
//! (default `warn`).
//!
//! Until the bridge drove the VFIO container, group and device itself,
//! this logger dropped a warning vfio-ioctls printed on every open (the
//! info of an IRQ index the bridge never uses). The bridge now asks VFIO
//! only for the IRQ indices it uses, so there is nothing to drop.

/// Install the logger for this process (`RUST_LOG` from the environment,
/// `warn` without it).
pub fn init() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
}
