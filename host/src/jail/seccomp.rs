//! The seccomp allowlists of jailed processes (`seccompiler`): one per process kind, kept in
//! `host/seccomp/<kind>.txt` (one system call per line), recorded from what the processes
//! really call (docs/security.md, "Seccomp allowlists", says how to record them again). A
//! system call outside the list kills the process (`SECCOMP_RET_KILL_PROCESS`). A line
//! `-name` refuses that call with ENOSYS instead, for calls a program makes and does without
//! (QEMU probes io_uring, then uses its thread pool): a second filter, since the kernel takes
//! the strictest answer of all filters.

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

/// A kind of jailed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `pleiades-host run --vmm qemu` and what it starts: device backends, QEMU (which adds its
    /// own `-sandbox on`), qemu-storage-daemon.
    VmQemu,
    /// `pleiades-host run --vmm pleiades` and its device backends.
    VmPleiades,
    /// The jail's waiting parent.
    Waiter,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::VmQemu, Kind::VmPleiades, Kind::Waiter];

    /// The list's file name (`host/seccomp/NAME.txt`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::VmQemu => "vm-qemu",
            Kind::VmPleiades => "vm-pleiades",
            Kind::Waiter => "waiter",
        }
    }

    /// The allowed system calls' names.
    pub fn syscalls(self) -> Vec<&'static str> {
        self.lines().filter(|l| !l.starts_with('-')).collect()
    }

    /// The system calls refused with ENOSYS.
    pub fn refused(self) -> Vec<&'static str> {
        self.lines().filter_map(|l| l.strip_prefix('-')).collect()
    }

    fn lines(self) -> impl Iterator<Item = &'static str> {
        let text = match self {
            Kind::VmQemu => include_str!("../../seccomp/vm-qemu.txt"),
            Kind::VmPleiades => include_str!("../../seccomp/vm-pleiades.txt"),
            Kind::Waiter => include_str!("../../seccomp/waiter.txt"),
        };
        text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty())
    }

    /// The compiled filter.
    pub fn filter(self) -> Result<Filter> {
        let rules = |calls: Vec<&str>| -> Vec<serde_json::Value> {
            calls.into_iter().map(|s| serde_json::json!({ "syscall": s })).collect()
        };
        let mut json = serde_json::json!({
            "allow": {
                "mismatch_action": "kill_process",
                "match_action": "allow",
                // The refused calls too: the refusing filter's ENOSYS is stricter than this
                // one's allow, while a kill here would be stricter than ENOSYS.
                "filter": rules(self.syscalls().into_iter().chain(self.refused()).collect())
            }
        });
        let refused = self.refused();
        if !refused.is_empty() {
            json["refuse"] = serde_json::json!({
                "mismatch_action": "allow",
                "match_action": { "errno": nix::libc::ENOSYS },
                "filter": rules(refused),
            });
        }
        let mut map = seccompiler::compile_from_json(json.to_string().as_bytes(), arch())
            .with_context(|| format!("the {} seccomp allowlist does not compile", self.name()))?;
        let allow = map.remove("allow").ok_or_else(|| anyhow!("the {} filter is missing", self.name()))?;
        Ok(Filter(std::iter::once(allow).chain(map.remove("refuse")).collect()))
    }
}

fn arch() -> seccompiler::TargetArch {
    #[cfg(target_arch = "x86_64")]
    return seccompiler::TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return seccompiler::TargetArch::aarch64;
}

/// A compiled allowlist (and its refusals).
#[derive(Debug)]
pub struct Filter(Vec<seccompiler::BpfProgram>);

impl Filter {
    /// Installs the filter on the calling thread (threads and processes it starts inherit it).
    pub fn apply(&self) -> Result<()> {
        for program in &self.0 {
            seccompiler::apply_filter(program).context("seccomp refused the filter")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles_and_has_no_duplicates() {
        for kind in Kind::ALL {
            let calls = kind.syscalls();
            assert!(calls.len() > 10, "{}: {} calls", kind.name(), calls.len());
            let mut sorted: Vec<&str> = calls.iter().chain(&kind.refused()).copied().collect();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                calls.len() + kind.refused().len(),
                "{} names a call twice",
                kind.name()
            );
            kind.filter().unwrap();
        }
    }

    #[test]
    fn no_list_allows_what_would_undo_the_jail() {
        for kind in Kind::ALL {
            let calls = kind.syscalls();
            for forbidden in [
                "chroot",
                "pivot_root",
                "mount",
                "umount2",
                "setns",
                "unshare",
                "ptrace",
                "init_module",
                "kexec_load",
                "bpf",
                "setuid",
                "acct",
            ] {
                assert!(!calls.contains(&forbidden), "{} allows {forbidden}", kind.name());
            }
        }
    }

    #[test]
    fn a_call_outside_the_list_kills_the_process_and_one_inside_does_not() {
        // In child processes of this test (a filter cannot be removed once installed): one
        // exits after the filter is on, the other calls chroot, which no list allows.
        if let Some(mode) = std::env::var_os("PLEIADES_SECCOMP_CHILD") {
            Kind::Waiter.filter().unwrap().apply().unwrap();
            if mode == "forbidden" {
                let _ = std::os::unix::fs::chroot("/");
            }
            std::process::exit(7);
        }
        use std::os::unix::process::ExitStatusExt;
        let child = |mode: &str| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "jail::seccomp::tests::a_call_outside_the_list_kills_the_process_and_one_inside_does_not",
                ])
                .args(["--test-threads=1", "--nocapture"])
                .env("PLEIADES_SECCOMP_CHILD", mode)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
        };
        let allowed = child("allowed");
        assert_eq!(allowed.code(), Some(7), "{allowed:?}");
        let forbidden = child("forbidden");
        assert_eq!(forbidden.signal(), Some(nix::libc::SIGSYS), "{forbidden:?}");
    }
}
