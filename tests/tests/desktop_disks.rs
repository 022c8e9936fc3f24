//! Desktops' disks end to end, through the broker and `pleiades-host serve` (`--vmm qemu`): an
//! image with a disk template (an ext4 filesystem, qcow2), desktops on copy-on-write overlays
//! that the test image's init mounts on /home. Commands are typed on the guest's keyboard
//! (the control socket's `type`) and answer on its serial console.
//!
//! - Persistent: a file written in the desktop survives a restart of the desktop, the user's
//!   logout, and a restart of the host daemon (the broker starts the desktop again on the same
//!   disk).
//! - Floating: the same file is gone after logout and recycle; recompose (`pool recompose`)
//!   reaches the desktop at its next recycle; two desktops of one template share it on the host
//!   (one kept template, small overlays: sizes printed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use pleiades_control::{self as control, Request};
use pleiades_tests::disk::ext4_template;
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::boot_timeout;
use pleiades_tests::stack::{Stack, StackOptions};
use pleiades_tests::wait_for;
use serde_json::Value;

const TEMPLATE_MIB: u32 = 64;

/// A stack with one pool of `kind` whose image's disk template (`home-v1.qcow2`) holds
/// `files`, and Alice's desktop from it, booted: (stack, Alice's bearer token, desktop id).
fn alices_desktop(
    dir: &Path,
    kind: &'static str,
    max: u32,
    spares: u32,
    files: &[(&str, &str)],
) -> (Stack, String, String) {
    let template = dir.join("home-v1.qcow2");
    ext4_template(&template, TEMPLATE_MIB, files).unwrap();
    let mut stack = stack(dir, kind, max, spares, &template);
    let bearer = stack.login("alice", "alice-password-1").unwrap();
    let desktop = stack.request_desktop(&bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    stack.wait_booted(&desktop, 1);
    (stack, bearer, desktop)
}

/// A stack with one pool of `kind` whose image has the disk template `template`.
fn stack(dir: &Path, kind: &'static str, max: u32, spares: u32, template: &Path) -> Stack {
    let options = StackOptions {
        spares,
        disk: Some(template.to_owned()),
        pool_kind: kind,
        max,
        ..StackOptions::local(dir).unwrap()
    };
    Stack::start(options, &GuestImage::locate().expect("test guest image")).unwrap()
}

/// The user's desktop in `state`, as the API reports it.
fn state_of(stack: &Stack, bearer: &str, desktop: &str) -> Option<String> {
    let mine = stack.get("/api/v1/desktops", bearer).ok()?;
    let found = mine.as_array()?.iter().find(|d| d["id"] == desktop)?;
    found["state"].as_str().map(str::to_owned)
}

/// The user's desktop booted again (more than `boots` READY lines) and theirs, after its VM
/// was lost or reverted: a failed desktop is restarted (once the broker's retry wait allows),
/// a ready one requested. The broker notices a lost VM only after two heartbeats, so the
/// desktop can still say `in_use` for a while after its VM is gone: only a new boot ends the
/// wait.
fn bring_back(stack: &mut Stack, bearer: &str, desktop: &str, boots: usize) {
    wait_for("the desktop to boot again and be the user's", boot_timeout(), || {
        let state = state_of(stack, bearer, desktop);
        match state.as_deref() {
            Some("failed") => {
                let _ = stack.act(&format!("/api/v1/desktops/{desktop}/restart"), bearer);
            }
            Some("ready") => {
                let _ = stack.request_desktop(bearer);
            }
            _ => {}
        }
        let booted = stack.serial(desktop).matches("PLEIADES-READY").count() > boots;
        if booted && state.as_deref() == Some("in_use") {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(500));
        None
    })
    .unwrap_or_else(|e| {
        panic!("{e}; serial console:\n{}\nhost log:\n{}", stack.serial(desktop), stack.logs_tail())
    });
}

/// `len` bytes of text that no compression shrinks much.
fn pseudo_random_text(len: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

fn file_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn overlays(stack: &Stack) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(stack.host_state.join("disks"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    found.sort();
    found
}

#[test]
fn a_persistent_desktop_keeps_its_files_across_restarts_logout_and_a_host_restart() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB of data the desktops share: their overlays must not copy it. A spare desktop: two
    // desktops on one template.
    let shared = pseudo_random_text(8 << 20);
    let files = [("README", "template-v1"), ("shared.txt", shared.as_str())];
    let (mut stack, bearer, desktop) = alices_desktop(dir.path(), "persistent", 2, 1, &files);

    // The template's file is there, on an ext4 /home from /dev/vda.
    stack.run_in_guest(
        &desktop,
        "echo CHECK1-$(cat /home/README)-$(grep -c '^/dev/vda /home ext4' /proc/mounts) > /dev/ttyS0",
        "CHECK1-template-v1-1",
    );
    stack.run_in_guest(
        &desktop,
        "echo PERSIST-$((6*7)) > /home/mine; sync; echo WROTE-$(cat /home/mine) > /dev/ttyS0",
        "WROTE-PERSIST-42",
    );
    // The guest's `sync` reached QEMU's block layer as flushes (which it passes to the host's
    // disk as fdatasync: cache.no-flush=off).
    let control = stack.host_state.join("desktops").join(&desktop).join("control.sock");
    let status = control::request(&control, &Request::Status, Duration::from_secs(10)).unwrap();
    let disks = &status.result.as_ref().unwrap()["disks"];
    assert!(disks[0]["flush_operations"].as_u64() > Some(0), "{disks}");
    assert!(disks[0]["wr_bytes"].as_u64() > Some(0), "{disks}");
    // The user's desktop and the spare share one template on the host; their overlays hold
    // only what each wrote.
    let both = wait_for("the spare's overlay", boot_timeout(), || {
        let found = overlays(&stack);
        (found.len() == 2).then_some(found)
    })
    .unwrap();
    let templates: Vec<PathBuf> =
        std::fs::read_dir(stack.host_state.join("templates")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(templates.len(), 1, "one kept template: {templates:?}");
    let template_bytes = file_size(&templates[0]);
    for overlay in &both {
        let bytes = file_size(overlay);
        println!("{}: {bytes} bytes on the host (template: {template_bytes} bytes)", overlay.display());
        assert!(bytes * 4 < template_bytes, "an overlay holds only its desktop's writes: {bytes} bytes");
    }

    // The desktop restarts: its disk is kept.
    stack.act(&format!("/api/v1/desktops/{desktop}/restart"), &bearer).unwrap();
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    stack.wait_booted(&desktop, 2);
    stack.run_in_guest(&desktop, "echo AFTER1-$(cat /home/mine) > /dev/ttyS0", "AFTER1-PERSIST-42");

    // The user logs out and comes back: the same desktop, still with the file.
    stack.act(&format!("/api/v1/desktops/{desktop}/release"), &bearer).unwrap();
    assert_eq!(stack.request_desktop(&bearer).unwrap(), desktop, "a persistent desktop stays the user's");
    stack.run_in_guest(&desktop, "echo AFTER2-$(cat /home/mine) > /dev/ttyS0", "AFTER2-PERSIST-42");

    // The host daemon restarts (its VMs are powered off with it); the broker starts the
    // desktop again on the same disk.
    let boots = stack.serial(&desktop).matches("PLEIADES-READY").count();
    stack.restart_host(2).unwrap();
    bring_back(&mut stack, &bearer, &desktop, boots);
    stack.run_in_guest(&desktop, "echo AFTER3-$(cat /home/mine) > /dev/ttyS0", "AFTER3-PERSIST-42");

    // The owner resets the desktop: a fresh disk on the pool's image.
    let boots = stack.serial(&desktop).matches("PLEIADES-READY").count();
    stack.act(&format!("/api/v1/desktops/{desktop}/reset"), &bearer).unwrap();
    bring_back(&mut stack, &bearer, &desktop, boots);
    stack.run_in_guest(
        &desktop,
        "echo AFTER4-$(cat /home/mine 2>/dev/null || echo gone)-$(cat /home/README) > /dev/ttyS0",
        "AFTER4-gone-template-v1",
    );
}

#[test]
fn floating_desktops_revert_at_logout_take_a_recomposed_image_and_share_their_template() {
    let dir = tempfile::tempdir().unwrap();
    let (mut stack, bearer, desktop) =
        alices_desktop(dir.path(), "floating", 1, 0, &[("README", "template-v1")]);
    stack.run_in_guest(
        &desktop,
        "echo FLOAT-$((6*7)) > /home/mine; sync; echo WROTE-$(cat /home/mine)-$(cat /home/README) > /dev/ttyS0",
        "WROTE-FLOAT-42-template-v1",
    );

    // Logout: the desktop is recycled onto a fresh overlay; the pool's only desktop comes back.
    stack.act(&format!("/api/v1/desktops/{desktop}/release"), &bearer).unwrap();
    let again =
        wait_for("the recycled desktop", boot_timeout(), || stack.request_desktop(&bearer).ok()).unwrap();
    assert_eq!(again, desktop, "the pool has one desktop");
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    stack.wait_booted(&desktop, 2);
    stack.run_in_guest(
        &desktop,
        "echo AFTER-$(cat /home/mine 2>/dev/null || echo gone)-$(cat /home/README) > /dev/ttyS0",
        "AFTER-gone-template-v1",
    );

    // Recompose: a new template version reaches the desktop at its next recycle.
    let v2 = dir.path().join("home-v2.qcow2");
    ext4_template(&v2, TEMPLATE_MIB, &[("README", "template-v2")]).unwrap();
    let image = GuestImage::locate().unwrap();
    #[rustfmt::skip]
    stack.cli(&["image", "add", "testdesk-v2", "--kernel", &image.kernel.display().to_string(),
                "--initrd", &image.initramfs.display().to_string(), "--cmdline", pleiades_tests::qemu::BASE_CMDLINE,
                "--vcpus", "1", "--memory-mib", "512", "--disk", &v2.display().to_string()]).unwrap();
    stack.cli(&["pool", "recompose", pleiades_tests::stack::POOL, "--image", "testdesk-v2"]).unwrap();
    stack.act(&format!("/api/v1/desktops/{desktop}/release"), &bearer).unwrap();
    let again =
        wait_for("the recycled desktop", boot_timeout(), || stack.request_desktop(&bearer).ok()).unwrap();
    assert_eq!(again, desktop);
    stack.wait_in_use(&bearer, &desktop, boot_timeout()).unwrap();
    stack.wait_booted(&desktop, 3);
    stack.run_in_guest(
        &desktop,
        "echo RECOMPOSED-$(cat /home/README) > /dev/ttyS0",
        "RECOMPOSED-template-v2",
    );

    // Two templates kept on the host (v1, v2), each once, read-only; the overlay is small.
    let templates: Vec<PathBuf> = std::fs::read_dir(stack.host_state.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(templates.len(), 2, "{templates:?}");
    let overlays = overlays(&stack);
    assert_eq!(overlays.len(), 1, "{overlays:?}");
    let (template_bytes, overlay_bytes) = (file_size(&templates[0]), file_size(&overlays[0]));
    println!("template {template_bytes} bytes on disk, the desktop's overlay {overlay_bytes} bytes");
    assert!(overlay_bytes < template_bytes, "{overlay_bytes} vs {template_bytes}");
    let audit: Value = Value::String(stack.cli(&["audit", "--limit", "200"]).unwrap().0);
    assert!(audit.as_str().unwrap().contains("pool.recompose"), "{audit}");
}
