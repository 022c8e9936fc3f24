//! The only `unsafe` code of the VMM: creating the memfd behind guest RAM and telling KVM where
//! that RAM lives in the VMM's address space. Everything else goes through safe wrappers.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use pleiades_virtio::GuestMemory;

/// Creates an anonymous, sealed-size-less memfd of `size` bytes. Guest RAM lives in one so that
/// a vhost-user backend can map the same pages.
pub fn memfd(name: &CStr, size: u64) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is valid, and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Registers every region of `mem` with the VM, slot `i` for region `i`.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping at `userspace_addr` is `memory_size` bytes long and stays mapped
        // for as long as the VM exists: the `GuestMemory` is owned by the machine that owns
        // the `VmFd`, and the machine drops the VM (its vCPUs first) before the memory.
        unsafe { vm.set_user_memory_region(region_desc)? };
    }
    Ok(())
}
