//! The guest kernel: found in the cache `integration/lab/setup` fills, and
//! the modules the initramfs carries, in load order.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _};

/// Modules the guest loads at boot, by name. Dependencies are added from
/// `modules.dep`; a name the kernel lacks is logged, not fatal.
pub const GUEST_MODULES: &[&str] = &[
    // 9p root share
    "netfs",
    "9pnet",
    "9pnet_virtio",
    "9p",
    // VFIO
    "irqbypass",
    "vfio",
    "vfio_iommu_type1",
    "vfio-pci-core",
    "vfio-pci",
    // vDPA / vhost (VDUSE suites)
    "vhost",
    "vhost_iotlb",
    "vdpa",
    "vhost_vdpa",
    "vduse",
    "virtio_vdpa",
    // nested KVM (Cloud Hypervisor suites)
    "ccp",
    "kvm",
    "kvm-amd",
];

/// An unpacked Debian kernel image package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r`, e.g. `6.12.95+deb12-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`.
    pub modules_dir: PathBuf,
}

/// Default cache root, as in `integration/lab/setup`.
pub fn cache_root() -> PathBuf {
    if let Some(c) = std::env::var_os("VDPA_LAB_CACHE") {
        return c.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/vdpa-lab")
}

impl Kernel {
    /// The kernel under `root` (a `dpkg-deb -x` tree), or when `None` the most
    /// recently completed `kernel-*` in the cache.
    pub fn find(root: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = match root {
            Some(r) => r,
            None => newest_cached(&cache_root())?,
        };
        let boot = root.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .with_context(|| format!("read {}", boot.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .max()
            .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
        let release = vmlinuz
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .trim_start_matches("vmlinuz-")
            .to_string();
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&release))
            .find(|d| d.join("modules.dep").exists())
            .with_context(|| {
                format!(
                    "no modules.dep for {release} under {} (run integration/lab/setup)",
                    root.display()
                )
            })?;
        Ok(Self {
            release,
            vmlinuz,
            modules_dir,
        })
    }

    /// Resolve [`GUEST_MODULES`] (plus `extra`) against this kernel.
    pub fn resolve(&self, wanted: &[&str]) -> anyhow::Result<Resolution> {
        let read = |f: &str| {
            let p = self.modules_dir.join(f);
            std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
        };
        let builtin = read("modules.builtin").unwrap_or_default();
        Ok(resolve(&read("modules.dep")?, &builtin, wanted))
    }

    /// The decompressed bytes of a module (`.ko`, `.ko.xz`).
    pub fn module_bytes(&self, rel: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.modules_dir.join(rel);
        if rel.ends_with(".ko") {
            return std::fs::read(&path).with_context(|| format!("read {}", path.display()));
        }
        ensure!(rel.ends_with(".ko.xz"), "unsupported module compression: {rel}");
        let out = Command::new("xz")
            .arg("-dc")
            .arg(&path)
            .output()
            .context("run xz (install xz-utils)")?;
        if !out.status.success() {
            bail!(
                "xz -dc {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }
}

fn newest_cached(cache: &Path) -> anyhow::Result<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(cache)
        .with_context(|| format!("no kernel cache at {} (run integration/lab/setup)", cache.display()))?
        .flatten()
    {
        let done = e.path().join(".complete");
        if !e.file_name().to_string_lossy().starts_with("kernel-") {
            continue;
        }
        if let Ok(t) = done.metadata().and_then(|m| m.modified()) {
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, e.path().join("root")));
            }
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no complete kernel-* in {}", cache.display()))
}

/// A module to put in the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Normalized name (`vfio_pci`).
    pub name: String,
    /// Path relative to the modules dir, from `modules.dep`.
    pub rel: String,
}

/// The outcome of resolving wanted modules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Modules to load, dependencies first.
    pub load: Vec<Module>,
    /// Wanted names built into the kernel (nothing to load).
    pub builtin: Vec<String>,
    /// Wanted names the kernel has neither as module nor built in.
    pub missing: Vec<String>,
}

/// `kvm-amd` and `kvm_amd` are the same module.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn name_of(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

/// Resolve `wanted` against the text of `modules.dep` and `modules.builtin`:
/// a post-order walk of the dependency graph, so dependencies load first.
pub fn resolve(modules_dep: &str, modules_builtin: &str, wanted: &[&str]) -> Resolution {
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in modules_dep.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        let d = rest.split_whitespace().map(name_of).collect();
        deps.insert(name_of(m), (m.trim().to_string(), d));
    }
    let builtin: HashSet<String> = modules_builtin.lines().map(name_of).collect();

    fn visit(
        n: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        out: &mut Vec<Module>,
    ) {
        if !seen.insert(n.to_string()) {
            return;
        }
        let Some((rel, ds)) = deps.get(n) else {
            return;
        };
        for d in ds {
            visit(d, deps, seen, out);
        }
        out.push(Module {
            name: n.to_string(),
            rel: rel.clone(),
        });
    }

    let mut res = Resolution::default();
    let mut seen = HashSet::new();
    for w in wanted {
        let n = normalize(w);
        if deps.contains_key(&n) {
            visit(&n, &deps, &mut seen, &mut res.load);
        } else if builtin.contains(&n) {
            res.builtin.push(n);
        } else {
            res.missing.push(n);
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/vfio/pci/vfio-pci-core.ko.xz: kernel/drivers/vfio/vfio.ko.xz kernel/virt/lib/irqbypass.ko.xz
kernel/drivers/vfio/vfio.ko.xz:
kernel/virt/lib/irqbypass.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz:
kernel/fs/netfs/netfs.ko.xz:
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio_pci.ko\n";

    fn names(r: &Resolution) -> Vec<&str> {
        r.load.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_load_before_their_users_once_each() {
        let r = resolve(DEP, BUILTIN, &["vfio-pci", "vfio", "9p"]);

        assert_eq!(
            names(&r),
            ["vfio", "irqbypass", "vfio_pci_core", "vfio_pci", "9pnet", "netfs", "9p"]
        );
    }

    #[test]
    fn builtin_and_missing_names_are_reported_not_loaded() {
        let r = resolve(DEP, BUILTIN, &["virtio_pci", "vp_vdpa"]);

        assert!(r.load.is_empty());
        assert_eq!(r.builtin, ["virtio_pci"]);
        assert_eq!(r.missing, ["vp_vdpa"]);
    }
}
