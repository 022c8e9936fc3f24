//! The desktop image: a graphical Debian trixie desktop on a disk, for pools of real desktops
//! (`target/desktop/`: `desktop.qcow2`, `vmlinuz`, `initrd.img`, `desktop.json`).
//!
//! - The root filesystem comes from Debian packages with `mmdebstrap` (trixie, no
//!   recommends): systemd, the trixie 6.12 kernel and its initramfs (initramfs-tools, which
//!   carries virtio-blk and ext4), Xorg's modesetting driver on virtio-gpu 2D (no 3D needed),
//!   LightDM logging the desktop user in automatically, and **Xfce**: a complete desktop (panel,
//!   terminal, file manager, editor) that runs well on a software-rendered X server, where
//!   GNOME or KDE need GPU acceleration to be usable and a Wayland compositor such as labwc
//!   would leave the session server without the X damage it already follows through
//!   virtio-gpu flushes either way; PipeWire on virtio-snd; systemd-networkd (DHCP on any
//!   `en*` NIC) with systemd-resolved.
//! - The Pleiades agent (static) is installed as `pleiades-agent-ready.service`, which prints
//!   the agent's `PLEIADES-READY` line on the serial console once the desktop is usable (the
//!   user's session runs its panel), as `pleiades-agent.service`, its link to the VM process
//!   over vsock, and as `pleiades-agent session` in every graphical session (XDG autostart),
//!   which reports the user's idle time (`xprintidle`) and lock state to the service. The host's
//!   lock request becomes `loginctl lock-sessions`, which light-locker carries out (it locks by
//!   switching to lightdm's greeter); unlocking brings the user's session back to the
//!   foreground (`pleiades-unlock`).
//! - The screen follows the client: `pleiades-display-follow`, started with the user's
//!   session, applies the monitors' preferred modes (left to right) whenever virtio-gpu raises
//!   a display hotplug, which the host does when the client's windows change size (X's
//!   modesetting driver learns the new modes, but applies none by itself). This is what
//!   spice-vdagent does for SPICE; it moves into the agent with its display configuration.
//! - The tree becomes an ext4 filesystem (`mkfs.ext4 -d`, no loop mount) of
//!   [`DISK_GIB`] GiB, converted to qcow2: a template that pools clone copy-on-write. The kernel
//!   and initrd are taken out for direct boot (`root=/dev/vda`).
//!
//! A stamp over the inputs (package list, hooks, agent) makes a second run a no-op.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The disk's size as the guest sees it (sparse on the host).
pub const DISK_GIB: u64 = 8;
/// The desktop user (logged in automatically).
pub const USER: &str = "user";
/// The kernel command line the image boots with.
pub const CMDLINE: &str = "root=/dev/vda rw console=tty1 console=ttyS0,115200 quiet";

/// What the image holds besides `mmdebstrap --variant=apt`'s base.
const PACKAGES: &[&str] = &[
    // boot
    "linux-image-amd64",
    "initramfs-tools",
    "systemd-sysv",
    "udev",
    "dbus",
    "dbus-user-session",
    "libpam-systemd",
    "e2fsprogs",
    // network
    "systemd-resolved",
    "iproute2",
    "ca-certificates",
    "curl",
    // graphics: Xorg with the modesetting driver (in the server) on virtio-gpu
    "xserver-xorg-core",
    "xserver-xorg-input-libinput",
    "x11-xserver-utils",
    // the agent's session part: the user's idle time from the X server
    "xprintidle",
    // the clipboard from a terminal (users' scripts, and the clipboard's end-to-end test)
    "xclip",
    "lightdm",
    "lightdm-gtk-greeter",
    // the screen lock (through lightdm's greeter) the agent locks on client disconnect
    "light-locker",
    // the desktop
    "xfce4-session",
    "xfwm4",
    "xfce4-panel",
    "xfdesktop4",
    "xfce4-settings",
    "xfconf",
    "xfce4-terminal",
    "thunar",
    "mousepad",
    "adwaita-icon-theme",
    "fonts-dejavu-core",
    // sound on virtio-snd
    "pipewire-audio",
    "alsa-utils",
    // admin
    "sudo",
    "less",
];

/// What `desktop.json` records.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub stamp: String,
    pub kernel_release: String,
    pub cmdline: String,
    pub user: String,
    /// Bytes of the qcow2 template on the host.
    pub qcow2_bytes: u64,
    /// Bytes the root filesystem's files take.
    pub rootfs_bytes: u64,
    pub build_seconds: f64,
}

/// Builds the image into `target/desktop/` under the workspace `root`.
pub fn build(root: &Path, force: bool) -> Result<Manifest> {
    let started = Instant::now();
    let out = root.join("target/desktop");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    for tool in ["mmdebstrap", "mkfs.ext4", "qemu-img"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.stdout.is_empty() {
            bail!("{tool} is missing: run `cargo xtask deps desktop-image` (as root)");
        }
    }
    let agent = crate::guest_image::build_agent(root)?;
    let hooks = customize_script(&agent);
    let stamp = {
        let mut h = DefaultHasher::new();
        PACKAGES.hash(&mut h);
        hooks.hash(&mut h);
        fs::read(&agent)?.hash(&mut h);
        format!("{:016x}", h.finish())
    };
    let manifest_path = out.join("desktop.json");
    if !force
        && let Ok(text) = fs::read_to_string(&manifest_path)
        && let Ok(manifest) = serde_json::from_str::<Manifest>(&text)
        && manifest.stamp == stamp
        && out.join("desktop.qcow2").is_file()
    {
        println!("desktop image: up to date ({})", out.join("desktop.qcow2").display());
        return Ok(manifest);
    }

    let rootfs = out.join("rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs).with_context(|| format!("cannot remove {}", rootfs.display()))?;
    }
    let hook_file = out.join("customize.sh");
    fs::write(&hook_file, &hooks)?;
    println!(
        "desktop image: mmdebstrap trixie with {} packages (downloads ~0.5 GB the first time)",
        PACKAGES.len()
    );
    let status = Command::new("mmdebstrap")
        .args(["--variant=apt", "--mode=root", "--format=directory", "--components=main"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg(format!("--customize-hook=sh {} \"$1\"", hook_file.display()))
        .args(["trixie"])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian")
        .status()
        .context("cannot run mmdebstrap")?;
    if !status.success() {
        bail!("mmdebstrap failed ({status})");
    }

    // Direct boot: the kernel and the image's own initramfs.
    let boot = rootfs.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        fs::read_dir(&boot)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
            .with_context(|| format!("no {prefix}* in {}", boot.display()))
    };
    let vmlinuz = find("vmlinuz-")?;
    let kernel_release =
        vmlinuz.file_name().unwrap_or_default().to_string_lossy().trim_start_matches("vmlinuz-").to_owned();
    fs::copy(&vmlinuz, out.join("vmlinuz"))?;
    fs::copy(find("initrd.img-")?, out.join("initrd.img"))?;

    let rootfs_bytes = du(&rootfs)?;
    let raw = out.join("desktop.raw");
    let _ = fs::remove_file(&raw);
    println!(
        "desktop image: ext4 of {DISK_GIB} GiB from {:.0} MiB of files",
        rootfs_bytes as f64 / 1048576.0
    );
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "pleiades-root", "-d"])
        .arg(&rootfs)
        .arg(&raw)
        .arg(format!("{DISK_GIB}G")))?;
    let qcow2 = out.join("desktop.qcow2");
    let partial = out.join("desktop.qcow2.partial");
    run(Command::new("qemu-img").args(["convert", "-p", "-O", "qcow2"]).arg(&raw).arg(&partial))?;
    fs::rename(&partial, &qcow2)?;
    fs::remove_file(&raw)?;
    fs::remove_dir_all(&rootfs)?;
    let manifest = Manifest {
        stamp,
        kernel_release,
        cmdline: CMDLINE.to_owned(),
        user: USER.to_owned(),
        qcow2_bytes: fs::metadata(&qcow2)?.len(),
        rootfs_bytes,
        build_seconds: started.elapsed().as_secs_f64(),
    };
    fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
    println!(
        "desktop image: built {} ({:.0} MiB, kernel {}) in {:.0} s",
        qcow2.display(),
        manifest.qcow2_bytes as f64 / 1048576.0,
        manifest.kernel_release,
        manifest.build_seconds
    );
    Ok(manifest)
}

/// The shell script mmdebstrap runs on the finished tree (`$1`).
fn customize_script(agent: &Path) -> String {
    format!(
        r#"#!/bin/sh
set -eu
root="$1"
echo pleiades-desktop > "$root/etc/hostname"
printf '/dev/vda / ext4 defaults,discard 0 1\n' > "$root/etc/fstab"
# The desktop user, logged in automatically; sudo without a password on a throwaway desktop
# is not given: the user has no password until an admin sets one.
chroot "$root" useradd --create-home --shell /bin/bash --groups audio,video,sudo {user}
mkdir -p "$root/etc/lightdm/lightdm.conf.d"
printf '[Seat:*]\nautologin-user={user}\nautologin-session=xfce\nuser-session=xfce\n' \
    > "$root/etc/lightdm/lightdm.conf.d/50-pleiades.conf"
chroot "$root" groupadd -f -r autologin
chroot "$root" gpasswd -a {user} autologin
chroot "$root" systemctl set-default graphical.target
# Network: DHCP on any wired NIC, DNS through resolved.
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' > "$root/etc/systemd/network/20-wired.network"
chroot "$root" systemctl enable systemd-networkd systemd-resolved
# The agent: its READY line on the serial console once the desktop is usable (the user's
# session has its panel; by then udev has bound the GPU the X server draws on), at most 5 min.
install -m 0755 {agent} "$root/usr/local/bin/pleiades-agent"
cat > "$root/etc/systemd/system/pleiades-agent-ready.service" <<'UNIT'
[Unit]
Description=Pleiades agent: report the desktop ready on the serial console
After=graphical.target lightdm.service
[Service]
Type=oneshot
ExecStartPre=/bin/sh -c 'for i in $(seq 300); do grep -qx xfce4-panel /proc/[0-9]*/comm 2>/dev/null && exit 0; sleep 1; done; exit 0'
ExecStart=/usr/local/bin/pleiades-agent ready
StandardOutput=file:/dev/ttyS0
TimeoutStartSec=330
[Install]
WantedBy=graphical.target
UNIT
chroot "$root" systemctl enable pleiades-agent-ready.service
# The agent's service: its link to the VM process over vsock (guest facts, the session's user,
# lock state and idle time, the host's power requests), and its per-user part in every
# graphical session (spice-vdagentd and spice-vdagent split the same way).
cat > "$root/etc/systemd/system/pleiades-agent.service" <<'UNIT'
[Unit]
Description=Pleiades agent: the desktop's link to its host
[Service]
ExecStart=/usr/local/bin/pleiades-agent run --poweroff /usr/sbin/poweroff --reboot /usr/sbin/reboot --lock "loginctl lock-sessions" --unlock /usr/local/bin/pleiades-unlock
Restart=always
RestartSec=2
[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable pleiades-agent.service
# Unlocking: the user's graphical session back in the foreground of its seat (light-locker
# locked it by switching to lightdm's greeter, and drops its lock when the session is active
# again), then every session told it is unlocked.
cat > "$root/usr/local/bin/pleiades-unlock" <<'SCRIPT'
#!/bin/sh
for s in $(loginctl list-sessions --no-legend | awk '{{print $1}}'); do
    if [ "$(loginctl show-session "$s" --property=Class --value)" = user ] &&
       [ "$(loginctl show-session "$s" --property=Type --value)" = x11 ]; then
        loginctl activate "$s"
    fi
done
loginctl unlock-sessions
SCRIPT
chmod 0755 "$root/usr/local/bin/pleiades-unlock"
mkdir -p "$root/etc/xdg/autostart"
printf '[Desktop Entry]\nType=Application\nName=Pleiades agent\nComment=Reports the session to the host\nExec=/usr/local/bin/pleiades-agent session\nNoDisplay=true\n' \
    > "$root/etc/xdg/autostart/pleiades-agent-session.desktop"
# A plain wallpaper (Pleiades blue) instead of xfdesktop's black when no backdrop image is
# installed: the defaults every user's session starts from.
mkdir -p "$root/etc/xdg/xfce4/xfconf/xfce-perchannel-xml"
backdrop='<property name="workspace0" type="empty"><property name="color-style" type="int" value="0"/><property name="image-style" type="int" value="0"/><property name="rgba1" type="array"><value type="double" value="0.114"/><value type="double" value="0.208"/><value type="double" value="0.341"/><value type="double" value="1"/></property></property>'
{{
    echo '<?xml version="1.0" encoding="UTF-8"?>'
    echo '<channel name="xfce4-desktop" version="1.0"><property name="backdrop" type="empty"><property name="screen0" type="empty">'
    for monitor in monitorVirtual-1 monitor0; do
        echo "<property name=\"$monitor\" type=\"empty\">$backdrop</property>"
    done
    echo '</property></property></channel>'
}} > "$root/etc/xdg/xfce4/xfconf/xfce-perchannel-xml/xfce4-desktop.xml"
# The screen follows the client's windows: at every DRM hotplug (virtio-gpu's display change),
# each connected monitor gets its preferred mode, left to right; disconnected ones go off.
cat > "$root/usr/local/bin/pleiades-display-follow" <<'SCRIPT'
#!/bin/sh
apply() {{
    args="" prev=""
    for out in $(xrandr --query | awk '$2 == "connected" {{print $1}}'); do
        if [ -z "$prev" ]; then
            args="$args --output $out --auto --pos 0x0"
        else
            args="$args --output $out --auto --right-of $prev"
        fi
        prev=$out
    done
    for out in $(xrandr --query | awk '$2 == "disconnected" {{print $1}}'); do
        args="$args --output $out --off"
    done
    [ -z "$args" ] || xrandr $args
}}
apply
udevadm monitor --udev --subsystem-match=drm | while read -r line; do
    case "$line" in
    *" change "*) apply ;;
    esac
done
SCRIPT
chmod 0755 "$root/usr/local/bin/pleiades-display-follow"
mkdir -p "$root/etc/xdg/autostart"
printf '[Desktop Entry]\nType=Application\nName=Pleiades display\nComment=The screen follows the client\nExec=/usr/local/bin/pleiades-display-follow\nNoDisplay=true\n' \
    > "$root/etc/xdg/autostart/pleiades-display-follow.desktop"
"#,
        user = USER,
        agent = agent.display()
    )
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Bytes the files under `dir` take (apparent sizes).
fn du(dir: &Path) -> Result<u64> {
    let output = Command::new("du").args(["-sb"]).arg(dir).output()?;
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du gave no size")
}
