//! Choosing who runs the guest's CPUs: KVM or QEMU's TCG.
//!
//! The build machines have a `/dev/kvm` that is a nested, software-assisted KVM (no `vmx`/`svm`
//! flag in /proc/cpuinfo): tiny guests run well on it, but a stock Linux kernel crawls through
//! early boot and then hits instructions its emulator lacks, while QEMU's TCG boots the test
//! image in seconds. So KVM is chosen only where the CPU has hardware virtualization.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

/// Environment variable that forces the choice.
pub const ACCEL_ENV: &str = "PLEIADES_ACCEL";

/// Who runs the guest's CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// The kernel's KVM.
    Kvm,
    /// QEMU's tiny code generator (software emulation).
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// The choice and why it was made, to be shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Why no accelerator can be used as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccelError {
    #[error(
        "{ACCEL_ENV}={0:?} is not understood: use `kvm`, `tcg`, or leave it unset to choose automatically"
    )]
    BadValue(String),
    #[error(
        "{ACCEL_ENV}=kvm but {path} is missing: load the KVM module (`modprobe kvm_intel` or `modprobe kvm_amd`), \
         enable virtualization in the firmware or for this VM, or use {ACCEL_ENV}=tcg"
    )]
    NoKvm { path: String },
    #[error(
        "{ACCEL_ENV}=kvm but {path} cannot be opened ({reason}): run as root or add this user to the `kvm` group, \
         or use {ACCEL_ENV}=tcg"
    )]
    KvmDenied { path: String, reason: String },
}

/// Whether the CPU flags in /proc/cpuinfo include hardware virtualization.
pub fn has_hardware_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Chooses from the environment, /proc/cpuinfo and /dev/kvm.
pub fn choose() -> Result<AccelChoice, AccelError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    choose_from(std::env::var(ACCEL_ENV).ok().as_deref(), &cpuinfo, Path::new("/dev/kvm"))
}

/// [`choose`] with its inputs spelled out.
pub fn choose_from(forced: Option<&str>, cpuinfo: &str, kvm: &Path) -> Result<AccelChoice, AccelError> {
    let kvm_usable = || -> Result<(), AccelError> {
        let path = kvm.display().to_string();
        match OpenOptions::new().read(true).write(true).open(kvm) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(AccelError::NoKvm { path }),
            Err(e) => Err(AccelError::KvmDenied { path, reason: e.to_string() }),
        }
    };
    match forced.map(str::trim).filter(|v| !v.is_empty()) {
        Some("kvm") => {
            kvm_usable()?;
            Ok(AccelChoice { accel: Accel::Kvm, reason: format!("forced by {ACCEL_ENV}=kvm") })
        }
        Some("tcg") => Ok(AccelChoice { accel: Accel::Tcg, reason: format!("forced by {ACCEL_ENV}=tcg") }),
        Some(other) => Err(AccelError::BadValue(other.to_owned())),
        None if !has_hardware_virtualization(cpuinfo) => Ok(AccelChoice {
            accel: Accel::Tcg,
            reason: "this CPU has no hardware virtualization (no vmx/svm flag): a nested, software-assisted \
                     KVM is too slow for a Linux guest"
                .into(),
        }),
        None => match kvm_usable() {
            Ok(()) => {
                Ok(AccelChoice { accel: Accel::Kvm, reason: "hardware virtualization and /dev/kvm".into() })
            }
            Err(e) => Ok(AccelChoice { accel: Accel::Tcg, reason: format!("KVM unusable: {e}") }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de vmx sse2\n";
    const NONE: &str = "processor\t: 0\nflags\t\t: fpu vme de sse2 hypervisor\n";

    #[test]
    fn automatic_choice() {
        let dir = tempfile::tempdir().unwrap();
        let fake_kvm = dir.path().join("kvm");
        std::fs::write(&fake_kvm, b"").unwrap();
        assert_eq!(choose_from(None, NONE, &fake_kvm).unwrap().accel, Accel::Tcg);
        assert_eq!(choose_from(None, VMX, &fake_kvm).unwrap().accel, Accel::Kvm);
        // Hardware support but no device: fall back to TCG and say why.
        let missing = dir.path().join("absent");
        let choice = choose_from(None, VMX, &missing).unwrap();
        assert_eq!(choice.accel, Accel::Tcg);
        assert!(choice.reason.contains("missing"), "{}", choice.reason);
    }

    /// The KVM host test fixture (`pleiades_tests::kvm_host`): QEMU TCG's `-cpu max` offers
    /// svm + npt, and `kvm_amd` runs Linux guests there, so its KVM counts as hardware-backed
    /// even though the CPU also says `hypervisor`. (This machine's own flags lack svm/vmx.)
    #[test]
    fn the_kvm_hosts_tcg_cpu_counts_as_hardware_virtualization() {
        let kvm_host = "processor\t: 0\nmodel name\t: QEMU TCG CPU version 2.5+\nflags\t\t: fpu de pse tsc msr pae \
             mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush acpi mmx fxsr sse sse2 ss ht syscall nx mmxext \
             pdpe1gb rdtscp lm 3dnowext 3dnow nopl xtopology cpuid pni pclmulqdq monitor ssse3 fma cx16 sse4_1 \
             sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy svm cr8_legacy \
             abm sse4a 3dnowprefetch vmmcall fsgsbase bmi1 avx2 smep bmi2 erms mpx rdseed adx smap clflushopt \
             clwb sha_ni xsaveopt xgetbv1 xsaveerptr wbnoinvd arat npt vgif umip pku ospke vaes la57 rdpid fsrm\n";
        assert!(has_hardware_virtualization(kvm_host));
        let dir = tempfile::tempdir().unwrap();
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, b"").unwrap();
        let choice = choose_from(None, kvm_host, &kvm).unwrap();
        assert_eq!(choice.accel, Accel::Kvm, "{}", choice.reason);
    }

    #[test]
    fn forced_choice_and_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent");
        assert_eq!(choose_from(Some("tcg"), VMX, &missing).unwrap().accel, Accel::Tcg);
        let err = choose_from(Some("kvm"), VMX, &missing).unwrap_err();
        assert!(matches!(err, AccelError::NoKvm { .. }));
        assert!(err.to_string().contains("modprobe kvm_intel"), "{err}");
        let err = choose_from(Some("hvf"), VMX, &missing).unwrap_err();
        assert_eq!(err, AccelError::BadValue("hvf".into()));
        // A directory cannot be opened read-write: "denied", not "missing".
        let err = choose_from(Some("kvm"), NONE, dir.path()).unwrap_err();
        assert!(matches!(err, AccelError::KvmDenied { .. }), "{err:?}");
    }
}
