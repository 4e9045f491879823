//! The command's logger: `env_logger`, driven by `RUST_LOG` as usual
//! (default `warn`), minus library warnings that are not the user's
//! concern.
//!
//! Only one such warning exists today: when it opens a device, vfio-ioctls
//! asks VFIO for every IRQ index and logs a warning for each index whose
//! info the kernel does not return (`VFIO_PCI_ERR_IRQ_INDEX`, 3, on QEMU's
//! devices). The bridge uses MSI-X alone and reports what it needs from it
//! as errors of its own, so that line is noise on every VFIO command. It is
//! dropped by its text, not by silencing vfio-ioctls: its other warnings
//! (a region it cannot read, say) stay visible. With `RUST_LOG` set, every
//! record the filter lets through is printed, that one too.

use log::{Level, Log, Metadata, Record};

/// The module and message prefix of the dropped warning (vfio-ioctls
/// 0.7.0, `VfioDeviceInfo::get_irqs`).
const IRQ_INFO_TARGET: &str = "vfio_ioctls";
const IRQ_INFO_PREFIX: &str = "Could not get VFIO IRQ info for index";

/// Whether `record` is a warning the user need not see (see the module
/// docs).
pub fn is_noise(record: &Record<'_>) -> bool {
    record.level() == Level::Warn
        && record.target().starts_with(IRQ_INFO_TARGET)
        && record.args().to_string().starts_with(IRQ_INFO_PREFIX)
}

/// `env_logger` with [`is_noise`] records dropped unless `RUST_LOG` is
/// set.
pub struct CliLogger {
    inner: env_logger::Logger,
    drop_noise: bool,
}

impl CliLogger {
    /// The logger for `rust_log`, the value of `RUST_LOG` (`None`: unset,
    /// then the default `warn` and noise dropped).
    pub fn new(rust_log: Option<&str>) -> Self {
        let mut b = env_logger::Builder::new();
        b.parse_filters(rust_log.unwrap_or("warn"));
        CliLogger {
            inner: b.build(),
            drop_noise: rust_log.is_none(),
        }
    }

    /// Whether `record` would be printed.
    pub fn keeps(&self, record: &Record<'_>) -> bool {
        self.inner.matches(record) && !(self.drop_noise && is_noise(record))
    }
}

impl Log for CliLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if self.keeps(record) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Install the logger for this process (`RUST_LOG` from the environment).
pub fn init() {
    let rust_log = std::env::var("RUST_LOG").ok();
    let logger = CliLogger::new(rust_log.as_deref());
    let max = logger.inner.filter();
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keeps(l: &CliLogger, level: Level, target: &str, msg: std::fmt::Arguments<'_>) -> bool {
        l.keeps(
            &Record::builder()
                .level(level)
                .target(target)
                .args(msg)
                .build(),
        )
    }

    #[test]
    fn default_drops_the_irq_info_warning_only() {
        let l = CliLogger::new(None);

        assert!(!keeps(
            &l,
            Level::Warn,
            "vfio_ioctls::vfio_device",
            format_args!("Could not get VFIO IRQ info for index {}", 3)
        ));
        assert!(keeps(
            &l,
            Level::Warn,
            "vfio_ioctls::vfio_device",
            format_args!("get_region_caps with invalid index: {}", 9)
        ));
        assert!(keeps(
            &l,
            Level::Warn,
            "vdpa_bridge::vfio",
            format_args!("Could not get VFIO IRQ info for index 3")
        ));
        assert!(!keeps(
            &l,
            Level::Info,
            "vdpa_bridge::vfio",
            format_args!("opened")
        ));
    }

    #[test]
    fn rust_log_set_shows_what_it_selects() {
        let l = CliLogger::new(Some("vfio_ioctls=warn"));

        assert!(keeps(
            &l,
            Level::Warn,
            "vfio_ioctls::vfio_device",
            format_args!("Could not get VFIO IRQ info for index {}", 3)
        ));
        assert!(!keeps(
            &l,
            Level::Warn,
            "vdpa_bridge::vfio",
            format_args!("not selected")
        ));
    }
}
