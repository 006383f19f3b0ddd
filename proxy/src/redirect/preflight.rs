//! What the kernel and this process must offer before the programs load: the kernel version,
//! capabilities, bpffs under the pin directory, the program types. The loader runs these checks
//! before it creates anything; `pullproxy doctor` reports each of them.

use std::{fs, path::Path};

use aya::{programs::ProgramType, util::KernelVersion};

use super::{LoaderError, cgroup::Cgroup2};

/// Oldest kernel with everything used here: bounded loops, BPF links for cgroups, sk lookup and
/// ancestor cgroup ids from sock_addr programs.
pub(crate) const MIN_KERNEL: (u8, u8) = (5, 8);

/// Filesystem magic of bpffs (`BPF_FS_MAGIC`).
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Filesystem magic of the cgroup v2 hierarchy (`CGROUP2_SUPER_MAGIC`).
pub const CGROUP2_MAGIC: i64 = 0x6367_7270;

/// Where pullproxy expects bpffs (and mounts it when it may).
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// Capabilities the loader looks at, in the order they are reported: BPF to create maps and load,
/// PERFMON for the verifier to accept the programs' pointer arithmetic, NET_ADMIN for cgroup
/// socket programs (measured: tests/tests/capabilities.rs), and SYS_ADMIN, only needed to mount
/// bpffs when the host has none.
pub(crate) const CAPS: [(u32, &str); 4] = [
    (39, "CAP_BPF"),
    (38, "CAP_PERFMON"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

/// The capabilities the loader cannot do without, among [`CAPS`].
const NEEDED_CAPS: usize = 3;

/// The BPF program types pullproxy loads, with the names the doctor reports them by.
pub(crate) const PROGRAM_TYPES: [(&str, ProgramType); 2] = [
    ("cgroup sock_addr", ProgramType::CgroupSockAddr),
    ("sock_ops", ProgramType::SockOps),
];

/// The checks that need no change to the system: kernel version, privileges, cgroup v2. Run
/// first at start, so a node that cannot redirect says why before anything is created.
pub(crate) fn check() -> Result<(), LoaderError> {
    check_kernel()?;
    check_privileges()?;
    Cgroup2::discover()?;
    Ok(())
}

/// Whether kernel `v` has everything pullproxy uses.
pub(crate) fn kernel_supported(v: KernelVersion) -> bool {
    v >= KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0)
}

fn check_kernel() -> Result<(), LoaderError> {
    // An unreadable version is not a reason to refuse: loading will tell.
    match KernelVersion::current() {
        Ok(v) => check_kernel_version(v),
        Err(_) => Ok(()),
    }
}

fn check_kernel_version(v: KernelVersion) -> Result<(), LoaderError> {
    if !kernel_supported(v) {
        return Err(LoaderError::KernelTooOld {
            found: format!("{v:?}"),
        });
    }
    Ok(())
}

/// Fails early, naming the missing capabilities, instead of a bare EPERM from a syscall later.
fn check_privileges() -> Result<(), LoaderError> {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return Ok(());
    };
    let missing = missing_caps(&status);
    if missing.is_empty() {
        return Ok(());
    }
    Err(LoaderError::NoPermission {
        detail: format!("missing {}", missing.join(", ")),
    })
}

/// The `CapEff` mask of `/proc/<pid>/status` text.
pub(crate) fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Needed capabilities absent from the `CapEff` line of `/proc/<pid>/status` text.
fn missing_caps(status: &str) -> Vec<&'static str> {
    let eff = effective_caps(status).unwrap_or(u64::MAX);
    // CAP_SYS_ADMIN implies CAP_BPF and CAP_PERFMON on kernels that predate them.
    let sys_admin = eff & (1 << 21) != 0;
    CAPS[..NEEDED_CAPS]
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0 && !(sys_admin && matches!(bit, 38 | 39)))
        .map(|(_, name)| *name)
        .collect()
}

/// The directory whose filesystem must be bpffs for pins under `pin_dir`: [`BPFFS`] itself when
/// the pins go below it, else `pin_dir`'s parent.
pub(crate) fn bpffs_probe(pin_dir: &Path) -> &Path {
    let root = Path::new(BPFFS);
    if pin_dir.starts_with(root) {
        root
    } else {
        pin_dir.parent().unwrap_or(pin_dir)
    }
}

/// The filesystem type (`statfs` `f_type`, e.g. [`BPF_FS_MAGIC`]) of the filesystem holding
/// `path`, or None if it cannot be read.
pub fn fs_magic(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statfs.
    let ret = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (ret == 0).then_some(st.f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_are_refused_by_name() {
        let err = check_kernel_version(KernelVersion::new(5, 4, 0)).unwrap_err();
        assert!(err.to_string().contains("too old"), "{err}");
        assert!(err.to_string().contains("5.8"), "{err}");
        check_kernel_version(KernelVersion::new(5, 8, 0)).unwrap();
        check_kernel_version(KernelVersion::new(6, 18, 44)).unwrap();
    }

    #[test]
    fn missing_capabilities_are_named() {
        // root: everything
        assert!(missing_caps("CapEff:\t000001ffffffffff\n").is_empty());
        // nobody
        let missing = missing_caps("Name: x\nCapEff:\t0000000000000000\n");
        assert_eq!(missing, vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        // CAP_BPF + CAP_NET_ADMIN only
        let missing = missing_caps(&format!("CapEff:\t{:016x}\n", (1u64 << 39) | (1 << 12)));
        assert_eq!(missing, vec!["CAP_PERFMON"]);
        // The measured set is enough.
        let set = (1u64 << 39) | (1 << 38) | (1 << 12);
        assert!(missing_caps(&format!("CapEff:\t{set:016x}\n")).is_empty());
    }

    #[test]
    fn capabilities_are_read_from_status() {
        assert_eq!(
            effective_caps("Name:\tx\nCapEff:\t000000c000001000\n"),
            Some(0xc0_0000_1000)
        );
        assert_eq!(effective_caps("Name:\tx\n"), None);
    }
}
