//! The guest kernel: Debian's newest 6.12 from bookworm-backports, resolved
//! at run time, cached by version, and the modules the initramfs carries,
//! in load order.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context as _};

/// Modules the guest loads at boot, by name. Dependencies are added from
/// `modules.dep`; a name the kernel lacks is reported, not fatal (the cases
/// that need it fail with a clear message instead).
pub const GUEST_MODULES: &[&str] = &[
    // 9p root share
    "netfs",
    "9pnet",
    "9pnet_virtio",
    "9p",
    // VFIO (intel-iommu is built in)
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

/// Where Debian's backports kernels come from.
pub const SUITE: &str = "bookworm-backports";

/// An unpacked Debian kernel image package.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Debian package version, e.g. `6.12.95-1~bpo12+1`.
    pub version: String,
    /// `uname -r`, e.g. `6.12.95+deb12-amd64`.
    pub release: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` (holds a `modules.dep`).
    pub modules_dir: PathBuf,
}

/// Run a command, returning its stdout; the error carries its stderr.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `linux-image-6.12.*-amd64` the metapackage depends on in `apt-cache
/// depends -t bookworm-backports linux-image-amd64` output.
pub fn parse_metapackage_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-6.12.") && p.ends_with("-amd64"))
        .map(str::to_string)
}

/// The candidate version in `apt-cache policy <pkg>` output.
pub fn parse_candidate(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .find(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

/// `(package, version)` of the newest 6.12 `-unsigned` image apt's current
/// lists offer from [`SUITE`].
fn resolve_package() -> anyhow::Result<(String, String)> {
    let deps =
        output(Command::new("apt-cache").args(["depends", "-t", SUITE, "linux-image-amd64"]))?;
    let image = parse_metapackage_depends(&deps)
        .with_context(|| format!("linux-image-amd64 in {SUITE} depends on no 6.12 image"))?;
    let pkg = format!("{image}-unsigned");
    let policy = output(Command::new("apt-cache").args(["policy", &pkg]))?;
    let ver = parse_candidate(&policy).with_context(|| format!("apt offers no {pkg}"))?;
    Ok((pkg, ver))
}

/// The newest 6.12 kernel from [`SUITE`], downloaded and unpacked into
/// `<cache>/kernel-<version>/` unless already there (no install into
/// `/boot`). When apt's lists name no kernel, runs `apt-get update` once.
/// When apt cannot answer at all (offline), falls back to the newest kernel
/// already in the cache, and says so.
///
/// # Errors
/// apt cannot resolve or download the package and the cache is empty, or
/// unpacking fails.
pub fn fetch(cache: &Path) -> anyhow::Result<Kernel> {
    let resolved = resolve_package().or_else(|first| {
        eprintln!("lab: {first:#}; running apt-get update");
        output(Command::new("apt-get").args(["update", "-qq"]))?;
        resolve_package()
    });
    let (pkg, ver) = match resolved {
        Ok(pv) => pv,
        Err(e) => {
            let dir = newest_cached(cache).with_context(|| format!("{e:#}"))?;
            eprintln!(
                "lab: cannot resolve a kernel from apt ({e:#}); using cached {}",
                dir.display()
            );
            return Kernel::open(&dir);
        }
    };
    let dir = cache.join(format!("kernel-{ver}"));
    if dir.join(".complete").exists() {
        return Kernel::open(&dir);
    }
    eprintln!("lab: downloading {pkg} {ver} into {}", dir.display());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    let deb_dir = dir.join("deb");
    std::fs::create_dir_all(&deb_dir)?;
    let download = || {
        output(
            Command::new("apt-get")
                .current_dir(&deb_dir)
                .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
                .arg(format!("{pkg}={ver}")),
        )
    };
    if let Err(e) = download() {
        // Stale lists can name a file the mirror no longer has.
        eprintln!("lab: {e:#}; running apt-get update and retrying");
        output(Command::new("apt-get").args(["update", "-qq"]))?;
        download()?;
    }
    let deb = std::fs::read_dir(&deb_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let root = dir.join("root");
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_dir_all(&deb_dir)?;
    let kernel = Kernel::open(&dir)?;
    std::fs::write(dir.join(".complete"), format!("{pkg} {ver}\n"))?;
    Ok(kernel)
}

/// The most recently completed `kernel-*` under `cache`.
fn newest_cached(cache: &Path) -> anyhow::Result<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(cache)
        .with_context(|| format!("no kernel cache at {}", cache.display()))?
        .flatten()
    {
        if !e.file_name().to_string_lossy().starts_with("kernel-") {
            continue;
        }
        if let Ok(t) = e
            .path()
            .join(".complete")
            .metadata()
            .and_then(|m| m.modified())
        {
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, e.path()));
            }
        }
    }
    best.map(|(_, p)| p)
        .with_context(|| format!("no complete kernel-* in {}", cache.display()))
}

impl Kernel {
    /// The kernel unpacked in `dir` (`dir/root` is the `dpkg-deb -x` tree).
    /// Runs `depmod` there when the package shipped no `modules.dep`.
    ///
    /// # Errors
    /// No `vmlinuz-*` or no modules directory, or `depmod` fails.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let root = dir.join("root");
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
        let (base, modules_dir) = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| (d, root.join(d).join(&release)))
            .find(|(_, d)| d.is_dir())
            .with_context(|| format!("no modules for {release} under {}", root.display()))?;
        if !modules_dir.join("modules.dep").exists() {
            // The image package's postinst would run depmod; we unpack only.
            // depmod -b wants <base>/lib/modules.
            let depmod_base = if base.starts_with("usr/") {
                root.join("usr")
            } else {
                root.clone()
            };
            output(
                Command::new("depmod")
                    .arg("-b")
                    .arg(&depmod_base)
                    .arg(&release),
            )
            .context("depmod (install kmod)")?;
        }
        let version = std::fs::read_to_string(dir.join(".complete"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_else(|| {
                let name = dir.file_name().unwrap_or_default().to_string_lossy();
                name.trim_start_matches("kernel-").to_string()
            });
        Ok(Self {
            version,
            release,
            vmlinuz,
            modules_dir,
        })
    }

    /// Resolve `wanted` module names against this kernel.
    ///
    /// # Errors
    /// `modules.dep` cannot be read.
    pub fn resolve(&self, wanted: &[&str]) -> anyhow::Result<Resolution> {
        let read = |f: &str| {
            let p = self.modules_dir.join(f);
            std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
        };
        let builtin = read("modules.builtin").unwrap_or_default();
        Ok(resolve(&read("modules.dep")?, &builtin, wanted))
    }

    /// The decompressed bytes of a module (`.ko`, `.ko.xz`).
    ///
    /// # Errors
    /// The file cannot be read or `xz -dc` fails.
    pub fn module_bytes(&self, rel: &str) -> anyhow::Result<Vec<u8>> {
        let path = self.modules_dir.join(rel);
        if rel.ends_with(".ko") {
            return std::fs::read(&path).with_context(|| format!("read {}", path.display()));
        }
        ensure!(
            rel.ends_with(".ko.xz"),
            "unsupported module compression: {rel}"
        );
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
            [
                "vfio",
                "irqbypass",
                "vfio_pci_core",
                "vfio_pci",
                "9pnet",
                "netfs",
                "9p"
            ]
        );
    }

    #[test]
    fn metapackage_dependency_names_the_image_package() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n";

        assert_eq!(
            parse_metapackage_depends(out).as_deref(),
            Some("linux-image-6.12.95+deb12-amd64")
        );
    }

    #[test]
    fn candidate_none_is_no_version() {
        let out = "p:\n  Installed: (none)\n  Candidate: (none)\n";

        assert_eq!(parse_candidate(out), None);
        assert_eq!(
            parse_candidate("  Candidate: 6.12.95-1~bpo12+1\n").as_deref(),
            Some("6.12.95-1~bpo12+1")
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
