//! The guest agent's link over vsock: QEMU attaches Pleiades' vsock device over vhost-user
//! (`vhost-user-vsock-pci`, served from the VM process), the Linux guest's own vsock driver
//! binds it, and `pleiades-agent run` in the guest connects to its VM process, which reports
//! what the agent said in `ctl status`. The agent is then killed and started again: the VM
//! process takes the new connection. `ctl shutdown` then goes through the agent.

use std::time::Duration;

use pleiades_control::{self as control, Request};
use pleiades_tests::image::GuestImage;
use pleiades_tests::qemu::{Guest, boot_timeout};
use serde_json::Value;

fn agent_status(socket: &std::path::Path) -> Value {
    let status = control::request(socket, &Request::Status, Duration::from_secs(30)).unwrap();
    assert!(status.ok, "{status:?}");
    status.result.unwrap()["agent"].clone()
}

#[test]
fn the_agent_reports_the_guest_over_vsock_and_reconnects_after_a_restart() {
    let image = GuestImage::locate().expect("test guest image");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vm.sock");
    let accel = pleiades_vmm::accel::choose().expect("accelerator");
    let host = pleiades_tests::workspace_binary("pleiades-host").unwrap();
    let args = ["--vmm", "qemu", "--device", "vsock"];
    let mut guest = Guest::start_host(&host, &image, &args, &socket, accel).expect("pleiades-host starts");
    let info = guest.wait_ready(boot_timeout()).expect("READY");
    let devices: Vec<_> = info.devices.iter().map(|d| (d.kind.as_str(), d.driver.as_str())).collect();
    assert_eq!(devices, [("vsock", "vmw_vsock_virtio_transport")]);

    // The guest's facts, as its own kernel gives them, arrive in the VM process.
    let agent = pleiades_testkit::wait_for("the agent's first report", Duration::from_secs(60), || {
        let agent = agent_status(&socket);
        (agent["connected"] == true && agent["kernel"].is_string()).then_some(agent)
    })
    .unwrap_or_else(|e| {
        let log = guest.run("cat /run/pleiades-agent.log", Duration::from_secs(30)).unwrap_or_default();
        panic!("{e}; status {:?}; agent log: {log:?}", agent_status(&socket))
    });
    assert_eq!(agent["agent_version"], env!("CARGO_PKG_VERSION"), "{agent}");
    assert_eq!(agent["version"], 1);
    assert_eq!(agent["kernel"], info.kernel.as_str());
    let hostname = guest.run("hostname", Duration::from_secs(30)).unwrap().join("");
    assert_eq!(agent["hostname"], hostname.as_str());
    assert_eq!(agent["os"], "Linux", "the busybox test image has no os-release");
    assert_eq!(agent["connections"], 1);
    assert!(agent.get("last_error").is_none(), "{agent}");

    // The guest changes its host name: the agent's next refresh reports it.
    guest.run("hostname desk-renamed", Duration::from_secs(30)).unwrap();
    pleiades_testkit::wait_for("the new host name", Duration::from_secs(60), || {
        (agent_status(&socket)["hostname"] == "desk-renamed").then_some(())
    })
    .unwrap();

    // The agent restarts: the VM process sees the old link close and takes the new one.
    guest.run("kill $(cat /run/pleiades-agent.pid)", Duration::from_secs(30)).unwrap();
    pleiades_testkit::wait_for("the link to close", Duration::from_secs(60), || {
        (agent_status(&socket)["connected"] == false).then_some(())
    })
    .unwrap();
    guest
        .run("(/usr/bin/pleiades-agent run >>/run/pleiades-agent.log 2>&1 &)", Duration::from_secs(30))
        .unwrap();
    let agent = pleiades_testkit::wait_for("the agent to connect again", Duration::from_secs(60), || {
        let agent = agent_status(&socket);
        (agent["connected"] == true && agent["connections"] == 2).then_some(agent)
    })
    .unwrap();
    assert_eq!(agent["hostname"], "desk-renamed");

    // `ctl shutdown` goes through the agent (the guest's own poweroff), not the power button,
    // which only follows if the guest has not gone down after a grace period.
    let shutdown = control::request(&socket, &Request::Shutdown, Duration::from_secs(30)).unwrap();
    assert!(shutdown.ok, "{shutdown:?}");
    let exit = guest.wait_exit(Duration::from_secs(90)).expect("pleiades-host exits");
    assert!(exit.success(), "{exit}");
    let console = guest.transcript().join("\n");
    assert!(!console.contains("power button pressed"), "the power button was needed:\n{console}");
}
