//! Devices served over vhost-user from a thread of the VM process: the GPU, the sound device
//! and vsock, whose host sides (the display sink, the played audio, the agent's link) the
//! session server and the agent thread in this process need. QEMU attaches them as `vhost-user-*-pci`; Pleiades' VMM attaches them as a
//! vhost-user frontend when `--device gpu,backend=vhost-user` asks for it. Each thread ends
//! when its frontend hangs up.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pleiades_virtio::VirtioDevice;
use pleiades_virtio::gpu::{Gpu, GpuHandle};
use pleiades_virtio::snd::{Sound, SoundHandle};
use pleiades_virtio::vhost_user;
use pleiades_virtio::vsock::{Vsock, VsockHandle};

use super::DeviceRequest;

/// The GPU, served from this process.
pub fn serve_gpu(request: &DeviceRequest, socket: &Path) -> Result<GpuHandle> {
    let gpu = Gpu::new(&request.gpu_config()).context("cannot create the GPU")?;
    let handle = gpu.handle();
    serve_in_thread(Box::new(gpu), socket)?;
    Ok(handle)
}

/// The sound device, served from this process like the GPU: its audio goes to the session
/// server in this process.
pub fn serve_sound(socket: &Path) -> Result<SoundHandle> {
    let sound = Sound::new().context("cannot create the sound device")?;
    let handle = sound.handle();
    serve_in_thread(Box::new(sound), socket)?;
    Ok(handle)
}

/// The vsock device, served from this process: the host end of every guest connection (the
/// agent's link) lives here, never in a host-wide socket.
pub fn serve_vsock(socket: &Path) -> Result<VsockHandle> {
    let (vsock, handle) =
        Vsock::new(super::agent::GUEST_CID, Default::default()).context("cannot create the vsock device")?;
    serve_in_thread(Box::new(vsock), socket)?;
    Ok(handle)
}

/// Serves `device` over vhost-user on a thread of this process and waits for its socket.
fn serve_in_thread(device: Box<dyn VirtioDevice>, socket: &Path) -> Result<()> {
    let name = device.device_type().name();
    let path = socket.to_owned();
    std::thread::Builder::new().name(format!("vhost-user-{name}")).spawn(move || {
        if let Err(e) = vhost_user::serve(device, &path) {
            tracing::error!("the {name} backend stopped: {e:#}");
        }
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("the {name} backend did not listen on {} within 10 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
