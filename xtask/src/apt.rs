//! Debian packages: the apt sources Pleiades needs and idempotent installs.
//!
//! Two extra suites are configured next to the machine's own bookworm sources, and pinned so
//! that a plain install takes from them only what it must:
//! - `bookworm-backports`, for QEMU 10 (bookworm's 7.2 lacks `vhost-user-snd-pci`): only the
//!   binary packages built from the `qemu` and `seabios` sources are preferred from there. The
//!   rest of QEMU's dependencies come from bookworm. (`apt-get install -t bookworm-backports`
//!   took every dependency it could from backports, Mesa's `libgbm1` among them, and the rest of
//!   Mesa from bookworm then could not be installed: mixed suites cascade.)
//! - `trixie`, for the guest kernel only, pinned to priority 100 so that a plain install never
//!   upgrades the host (an unpinned trixie upgraded libc6 and openssl when tried).
//!
//! Every missing package of every group is installed in one `apt-get install`, so that apt
//! resolves one consistent set.
//!
//! The guest kernel and busybox are *downloaded* (`apt-get download`), never installed on the
//! host.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// apt source file written by Pleiades.
pub const SOURCES_FILE: &str = "/etc/apt/sources.list.d/pleiades.sources";
/// apt preferences: QEMU from backports, trixie only when asked by name.
pub const PIN_FILE: &str = "/etc/apt/preferences.d/pleiades";
/// Where earlier versions kept the trixie pin alone (removed when found).
const OLD_PIN_FILE: &str = "/etc/apt/preferences.d/pleiades-trixie";

const SOURCES: &str = "\
# Written by `cargo xtask deps` (Pleiades). bookworm-backports: QEMU >= 9.
# trixie: the guest kernel only. Both pinned in /etc/apt/preferences.d/pleiades.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

const PIN: &str = "\
# Written by `cargo xtask deps` (Pleiades).
# QEMU >= 9 and its firmware from bookworm-backports; every other package from bookworm.
Package: src:qemu src:seabios
Pin: release n=bookworm-backports
Pin-Priority: 600

# trixie packages only when asked by name (the guest kernel, downloaded, never installed).
Package: *
Pin: release n=trixie
Pin-Priority: 100
";

/// A set of Debian packages the project needs for one purpose.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub name: &'static str,
    pub purpose: &'static str,
    pub packages: &'static [&'static str],
    /// Skip the group when this command is already on PATH, however it was installed (Node.js
    /// from NodeSource conflicts with Debian's `npm` package).
    pub unless_command: Option<&'static str>,
    /// debconf answers given before the install (`debconf-set-selections` lines), so that a
    /// package's maintainer scripts do what the project needs and ask nothing.
    pub preseed: &'static [&'static str],
}

/// Every package group. `xtask deps` with no argument installs all of them.
pub const GROUPS: &[Group] = &[
    Group {
        name: "build",
        purpose: "building the Rust workspace (nasm: OpenH264's assembly; without it H.264 encodes ~2.6x slower)",
        unless_command: None,
        preseed: &[],
        packages: &["build-essential", "pkg-config", "ca-certificates", "nasm"],
    },
    Group {
        name: "guest",
        purpose: "building the test guest image",
        unless_command: None,
        preseed: &[],
        packages: &["dpkg", "apt", "cpio"],
    },
    Group {
        name: "qemu",
        purpose: "booting guests under QEMU (>= 9 for vhost-user-snd-pci) and QEMU's vhost-user-gpu; \
                  desktops' disks (qemu-img, qemu-storage-daemon; mkfs.ext4 for test templates)",
        unless_command: None,
        preseed: &[],
        packages: &["qemu-system-x86", "qemu-system-gui", "qemu-utils", "e2fsprogs"],
    },
    Group {
        name: "spice",
        purpose: "the guest display benchmark's reference (benches/guest_display.rs): QEMU's SPICE \
                  server module (from bookworm-backports with the rest of src:qemu, by the pin) and \
                  remote-viewer as its client, and tcpdump, whose packet capture on loopback counts \
                  both sides' bytes",
        unless_command: None,
        preseed: &[],
        packages: &["qemu-system-modules-spice", "virt-viewer", "tcpdump"],
    },
    Group {
        name: "network",
        purpose: "desktops' networks: a namespace and veth per desktop (iproute2), the host's NAT and filter (nftables)",
        unless_command: None,
        preseed: &[],
        packages: &["iproute2", "nftables"],
    },
    Group {
        name: "desktop-image",
        purpose: "the desktop image (cargo xtask desktop-image): a trixie root filesystem from Debian packages",
        unless_command: None,
        preseed: &[],
        packages: &["mmdebstrap"],
    },
    Group {
        name: "postgresql",
        purpose: "the broker's PostgreSQL tests (server binaries; the tests start their own server)",
        unless_command: None,
        preseed: &[],
        packages: &["postgresql"],
    },
    Group {
        name: "ldap",
        purpose: "the broker's directory sign-in tests (OpenLDAP's slapd; the tests start their own \
                  server, so the package is told to configure and start none)",
        unless_command: None,
        preseed: &["slapd slapd/no_configuration boolean true"],
        packages: &["slapd"],
    },
    Group {
        name: "chromium",
        purpose: "the broker's browser tests (headless Chromium driven by playwright-core)",
        unless_command: None,
        preseed: &[],
        packages: &["chromium"],
    },
    Group {
        name: "gui",
        purpose: "the native client (winit + wgpu) and its tests under Xvfb with Mesa's software \
                  Vulkan/GL (lavapipe, llvmpipe), xdotool for typed input, xwd for screenshots, xclip for the clipboard's tests",
        unless_command: None,
        preseed: &[],
        packages: &[
            "mesa-vulkan-drivers",
            "libvulkan1",
            "libegl1",
            "libegl-mesa0",
            "libgl1-mesa-dri",
            "libxkbcommon-x11-0",
            "libx11-xcb1",
            "libxcursor1",
            "libxi6",
            "libxrandr2",
            "xvfb",
            "x11-apps",
            "x11-utils",
            "xdotool",
            "xclip",
        ],
    },
    Group {
        name: "sound",
        purpose: "audio: Opus (libopus-dev), cpal's ALSA backend (libasound2-dev), and a PulseAudio \
                  null sink that paces the client's playback in tests (no sound card here)",
        unless_command: None,
        preseed: &[],
        packages: &["libopus-dev", "libasound2-dev", "pulseaudio", "pulseaudio-utils"],
    },
    Group {
        name: "references",
        purpose: "outside references the tests check Pleiades against (edid-decode for the virtual \
                  monitors' EDID, ACPICA's iasl for the VMM's ACPI tables)",
        unless_command: None,
        preseed: &[],
        packages: &["edid-decode", "acpica-tools"],
    },
    Group {
        name: "node",
        purpose: "running the broker's browser tests (playwright-core 1.61, the newest that runs on \
                  Debian 12's Node.js 18)",
        unless_command: Some("npm"),
        preseed: &[],
        packages: &["nodejs", "npm"],
    },
];

/// What went wrong with apt, said so that the reader knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error(
        "installing Debian packages needs root (apt-get {what}). Run this command as root, \
         or install them yourself: apt-get install {packages}"
    )]
    NotRoot { what: String, packages: String },
    #[error(
        "apt could not reach the Debian mirrors ({detail}). Check the network connection and any \
         proxy (/etc/apt/apt.conf.d), then run the command again"
    )]
    Network { detail: String },
    #[error(
        "Debian package `{package}` is not available from the configured sources. Check that {SOURCES_FILE} \
         exists (`cargo xtask deps` writes it), run `apt-get update`, and check the name (`apt-cache search`)"
    )]
    MissingPackage { package: String },
    #[error("`{command}` failed ({status}): {detail}")]
    Failed { command: String, status: String, detail: String },
    #[error("cannot run `{command}`: {error}. Is this a Debian system with apt?")]
    Spawn { command: String, error: std::io::Error },
}

/// Runs apt commands. `extra` options go before the verb (tests point apt at scratch state).
#[derive(Debug, Clone, Default)]
pub struct Apt {
    extra: Vec<String>,
}

impl Apt {
    /// An apt that uses the system's configuration.
    pub fn system() -> Self {
        Self::default()
    }

    /// An apt with extra `-o Key=Value` style options (tests use it to isolate apt state).
    #[cfg(test)]
    pub fn with_options(extra: Vec<String>) -> Self {
        Self { extra }
    }

    /// Writes Pleiades' apt source and pin files if they differ. Returns whether anything changed.
    pub fn ensure_sources(&self) -> anyhow::Result<bool> {
        let mut changed = false;
        for (path, text) in [(SOURCES_FILE, SOURCES), (PIN_FILE, PIN)] {
            if fs::read_to_string(path).ok().as_deref() != Some(text) {
                if !is_root() {
                    return Err(AptError::NotRoot {
                        what: format!("sources in {path}"),
                        packages: String::new(),
                    }
                    .into());
                }
                fs::write(path, text).map_err(|e| anyhow::anyhow!("cannot write {path}: {e}"))?;
                println!("apt: wrote {path}");
                changed = true;
            }
        }
        if Path::new(OLD_PIN_FILE).exists() {
            fs::remove_file(OLD_PIN_FILE)
                .map_err(|e| anyhow::anyhow!("cannot remove {OLD_PIN_FILE}: {e}"))?;
            changed = true;
        }
        Ok(changed)
    }

    /// `apt-get update`.
    pub fn update(&self) -> Result<(), AptError> {
        println!("apt: updating package lists");
        self.run(&["update"], "")
    }

    /// Installs whichever packages of `groups` are missing, in one transaction, saying what and
    /// why.
    pub fn install_groups(&self, groups: &[Group]) -> anyhow::Result<()> {
        let mut wanted: Vec<String> = Vec::new();
        for group in groups {
            if group.unless_command.is_some_and(command_on_path) {
                continue;
            }
            let mut missing = missing_packages(group.packages)?;
            if group.name == "qemu" && qemu_too_old() && !missing.iter().any(|p| p == "qemu-system-x86") {
                missing.push("qemu-system-x86".to_owned());
            }
            if missing.is_empty() {
                continue;
            }
            println!("apt: {} missing (for {})", missing.join(" "), group.purpose);
            for package in missing {
                if !wanted.contains(&package) {
                    wanted.push(package);
                }
            }
        }
        if wanted.is_empty() {
            println!("apt: all Debian packages present");
            return Ok(());
        }
        if !is_root() {
            return Err(AptError::NotRoot { what: "install".into(), packages: wanted.join(" ") }.into());
        }
        if self.ensure_sources()? || !lists_present() {
            self.update()?;
        }
        let preseed: Vec<&str> = groups.iter().flat_map(|g| g.preseed.iter().copied()).collect();
        if !preseed.is_empty() {
            preseed_debconf(&preseed)?;
        }
        println!("apt: installing {} packages", wanted.len());
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(wanted.iter().map(String::as_str));
        match self.run(&args, &wanted.join(" ")) {
            // Stale lists are the usual reason for a package not found: refresh once.
            Err(AptError::MissingPackage { .. }) => {
                self.update()?;
                self.run(&args, &wanted.join(" "))?;
            }
            other => other?,
        }
        Ok(())
    }

    /// Downloads the newest `package` (from `release`, if given) into `dir`; returns its path.
    /// Already-downloaded files are reused.
    pub fn download(&self, package: &str, release: Option<&str>, dir: &Path) -> Result<PathBuf, AptError> {
        let version = self.candidate_version(package, release)?;
        let file_version = version.replace(':', "%3a");
        let expected = dir.join(format!("{package}_{file_version}_amd64.deb"));
        let expected_all = dir.join(format!("{package}_{file_version}_all.deb"));
        for path in [&expected, &expected_all] {
            if path.exists() {
                return Ok(path.clone());
            }
        }
        println!("apt: downloading {package} {version}");
        let spec = format!("{package}={version}");
        self.run_in(&["download", &spec], package, Some(dir))?;
        [expected, expected_all].into_iter().find(|p| p.exists()).ok_or_else(|| AptError::Failed {
            command: format!("apt-get download {spec}"),
            status: "ok".into(),
            detail: format!("no .deb for {package} appeared in {}", dir.display()),
        })
    }

    /// The version apt would pick for `package` in `release` (or overall).
    pub fn candidate_version(&self, package: &str, release: Option<&str>) -> Result<String, AptError> {
        let mut args: Vec<String> = self.extra.clone();
        args.extend(["policy".into(), package.into()]);
        let output = Command::new("apt-cache")
            .args(&args)
            .output()
            .map_err(|error| AptError::Spawn { command: "apt-cache policy".into(), error })?;
        let text = String::from_utf8_lossy(&output.stdout);
        parse_policy(&text, release).ok_or_else(|| AptError::MissingPackage { package: package.to_owned() })
    }

    /// The real package behind a metapackage's first dependency, e.g. `linux-image-amd64` in
    /// trixie → `linux-image-6.12.117+deb13-amd64`.
    pub fn metapackage_target(&self, meta: &str, release: &str) -> Result<String, AptError> {
        let mut args: Vec<String> = self.extra.clone();
        args.extend(["depends".into(), format!("{meta}/{release}")]);
        let output = Command::new("apt-cache")
            .args(&args)
            .output()
            .map_err(|error| AptError::Spawn { command: "apt-cache depends".into(), error })?;
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|dep| dep.starts_with("linux-image-"))
            .map(|dep| dep.trim().to_owned())
            .ok_or_else(|| AptError::MissingPackage { package: format!("{meta}/{release}") })
    }

    fn run(&self, args: &[&str], packages: &str) -> Result<(), AptError> {
        self.run_in(args, packages, None)
    }

    fn run_in(&self, args: &[&str], packages: &str, dir: Option<&Path>) -> Result<(), AptError> {
        let mut command = Command::new("apt-get");
        command.args(&self.extra).args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let shown = format!("apt-get {}", args.join(" "));
        // apt's progress goes to stdout and stays visible; its errors are kept to explain them.
        let output = command
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped())
            .output()
            .map_err(|error| AptError::Spawn { command: shown.clone(), error })?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors = classify(&stderr, &shown, packages);
        if output.status.success() {
            // `apt-get update` exits 0 even when every mirror failed.
            match errors {
                Some(e @ AptError::Network { .. }) => Err(e),
                _ => Ok(()),
            }
        } else {
            Err(errors.unwrap_or_else(|| AptError::Failed {
                command: shown,
                status: output.status.to_string(),
                detail: last_lines(&stderr, 5),
            }))
        }
    }
}

/// Turns apt's stderr into an [`AptError`] that says what to do, if it recognises it.
pub fn classify(stderr: &str, command: &str, packages: &str) -> Option<AptError> {
    for line in stderr.lines() {
        if let Some(rest) = line.split("Unable to locate package ").nth(1) {
            return Some(AptError::MissingPackage { package: rest.trim().to_owned() });
        }
        if line.contains("has no installation candidate")
            || line.contains("Can't find a source to download")
            || line.contains("Version '") && line.contains("was not found")
        {
            let package = line.rsplit('\'').nth(1).unwrap_or(packages).to_owned();
            return Some(AptError::MissingPackage { package });
        }
    }
    let network_markers = [
        "Temporary failure resolving",
        "Could not resolve",
        "Could not connect",
        "Unable to connect",
        "Connection failed",
        "Failed to fetch",
        "Network is unreachable",
        "Some index files failed to download",
    ];
    if let Some(line) = stderr.lines().find(|l| network_markers.iter().any(|m| l.contains(m))) {
        return Some(AptError::Network {
            detail: line.trim_start_matches("W: ").trim_start_matches("E: ").to_owned(),
        });
    }
    if stderr.contains("Could not open lock file") || stderr.contains("are you root?") {
        return Some(AptError::NotRoot { what: command.to_owned(), packages: packages.to_owned() });
    }
    None
}

/// Gives debconf its answers (`debconf-set-selections`) before packages are installed.
fn preseed_debconf(lines: &[&str]) -> Result<(), AptError> {
    use std::io::Write as _;
    let command = "debconf-set-selections";
    let mut child = Command::new(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| AptError::Spawn { command: command.into(), error })?;
    if let Some(mut stdin) = child.stdin.take() {
        let text = lines.join("\n") + "\n";
        stdin
            .write_all(text.as_bytes())
            .map_err(|error| AptError::Spawn { command: command.into(), error })?;
    }
    let output =
        child.wait_with_output().map_err(|error| AptError::Spawn { command: command.into(), error })?;
    if !output.status.success() {
        return Err(AptError::Failed {
            command: command.into(),
            status: output.status.to_string(),
            detail: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

/// The candidate version from `apt-cache policy` output, restricted to `release` if given.
fn parse_policy(text: &str, release: Option<&str>) -> Option<String> {
    let Some(release) = release else {
        let candidate = text.lines().find_map(|l| l.trim().strip_prefix("Candidate: "))?;
        return (candidate != "(none)").then(|| candidate.to_owned());
    };
    // Version table: "     1:10.0.2+ds-2 100" followed by lines naming the archive.
    let mut current: Option<&str> = None;
    let mut best: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start_matches([' ', '*']).trim();
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        if fields.len() == 2 && fields[1].parse::<i32>().is_ok() && !trimmed.contains("://") {
            current = Some(fields[0]);
        } else if let Some(version) = current
            && trimmed.contains("://")
            && fields.iter().any(|f| f.split('/').next() == Some(release))
            && best.is_none()
        {
            // apt lists versions newest first.
            best = Some(version.to_owned());
        }
    }
    best
}

/// Packages of `packages` that dpkg does not list as installed.
fn missing_packages(packages: &[&str]) -> anyhow::Result<Vec<String>> {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(packages)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run dpkg-query: {e}. Is this a Debian system?"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(packages
        .iter()
        .filter(|p| !text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [**p, "installed"]))
        .map(|p| (*p).to_owned())
        .collect())
}

/// QEMU older than 9 lacks vhost-user-snd-pci.
fn qemu_too_old() -> bool {
    let Ok(output) = Command::new("dpkg-query").args(["-W", "-f=${Version}", "qemu-system-x86"]).output()
    else {
        return true;
    };
    let version = String::from_utf8_lossy(&output.stdout);
    let upstream = version.split_once(':').map_or(version.as_ref(), |(_, v)| v);
    upstream.split('.').next().and_then(|m| m.parse::<u32>().ok()).is_none_or(|major| major < 9)
}

fn lists_present() -> bool {
    fs::read_dir("/var/lib/apt/lists")
        .map(|d| {
            d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().contains("bookworm-backports"))
        })
        .unwrap_or(false)
}

/// Whether `command` is an executable file in a directory of `PATH`.
pub fn command_on_path(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            fs::metadata(dir.join(command)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = String::new();
    for line in &lines[lines.len().saturating_sub(n)..] {
        let _ = writeln!(out, "{line}");
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_apt_failures() {
        let e = classify("E: Unable to locate package pleiades-nope\n", "apt-get install", "pleiades-nope");
        assert!(
            matches!(e, Some(AptError::MissingPackage { ref package }) if package == "pleiades-nope"),
            "{e:?}"
        );
        let e = classify(
            "W: Failed to fetch http://deb.debian.org/debian/dists/trixie/InRelease  Temporary failure resolving 'deb.debian.org'\n",
            "apt-get update",
            "",
        );
        assert!(matches!(e, Some(AptError::Network { .. })), "{e:?}");
        let e = classify(
            "E: Could not open lock file /var/lib/dpkg/lock-frontend - open (13: Permission denied)\n",
            "x",
            "y",
        );
        assert!(matches!(e, Some(AptError::NotRoot { .. })), "{e:?}");
        let e = classify(
            "E: Can't find a source to download version '1:1.35' of 'busybox-static:amd64'\n",
            "x",
            "",
        );
        assert!(
            matches!(e, Some(AptError::MissingPackage { ref package }) if package == "busybox-static:amd64"),
            "{e:?}"
        );
        assert!(classify("Reading package lists...\n", "x", "").is_none());
    }

    #[test]
    fn finds_commands_on_path() {
        assert!(command_on_path("sh"));
        assert!(!command_on_path("pleiades-no-such-command"));
    }

    #[test]
    fn picks_the_version_of_a_release() {
        let policy = "qemu-system-x86:
  Installed: (none)
  Candidate: 1:7.2+dfsg-7+deb12u18+b3
  Version table:
     1:10.0.13+ds-0+deb13u1 100
        100 http://deb.debian.org/debian trixie/main amd64 Packages
     1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
 *** 1:7.2+dfsg-7+deb12u18+b3 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
";
        assert_eq!(parse_policy(policy, None).as_deref(), Some("1:7.2+dfsg-7+deb12u18+b3"));
        assert_eq!(parse_policy(policy, Some("trixie")).as_deref(), Some("1:10.0.13+ds-0+deb13u1"));
        assert_eq!(
            parse_policy(policy, Some("bookworm-backports")).as_deref(),
            Some("1:10.0.2+ds-2+deb13u1~bpo12+1")
        );
        assert_eq!(parse_policy(policy, Some("sid")), None);
        assert_eq!(parse_policy("foo:\n  Installed: (none)\n  Candidate: (none)\n", None), None);
    }

    /// Real apt, pointed at a mirror on a closed loopback port: the error must say "network".
    #[test]
    fn no_network_is_a_clear_error() {
        let scratch = tempfile::tempdir().unwrap();
        let lists = scratch.path().join("lists");
        fs::create_dir_all(lists.join("partial")).unwrap();
        let sources = scratch.path().join("sources.list");
        fs::write(&sources, "deb [trusted=yes] http://127.0.0.1:9/debian bookworm main\n").unwrap();
        let apt = Apt::with_options(vec![
            format!("-oDir::Etc::SourceList={}", sources.display()),
            "-oDir::Etc::SourceParts=/nonexistent".into(),
            format!("-oDir::State::Lists={}", lists.display()),
            format!("-oDir::Cache={}", scratch.path().display()),
            "-oAcquire::Retries=0".into(),
            "-oAPT::Sandbox::User=root".into(),
        ]);
        let err = apt.update().unwrap_err();
        assert!(matches!(err, AptError::Network { .. }), "{err:?}");
        assert!(err.to_string().contains("Check the network"), "{err}");
        // With empty lists, no package can be found: that is a missing package, said clearly.
        let err = apt.download("pleiades-no-such-package", None, scratch.path()).unwrap_err();
        assert!(matches!(err, AptError::MissingPackage { .. }), "{err:?}");
        assert!(err.to_string().contains("apt-get update"), "{err}");
    }
}
