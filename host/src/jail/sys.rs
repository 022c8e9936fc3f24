//! The jail's three unsafe operations: forking, handing a file descriptor to a child, and
//! taking one over from the parent.
#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::unistd::ForkResult;

/// Checks that the process has one thread (`pleiades-host jail` starts none): [`fork`] relies
/// on it. Called while the host's `/proc` is still there.
pub(super) fn check_single_threaded() -> Result<()> {
    let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0);
    if threads != 1 {
        bail!("the jail must fork with one thread, not {threads}");
    }
    Ok(())
}

/// Forks. The caller has one thread ([`check_single_threaded`]), so the child may do anything
/// the parent could.
pub(super) fn fork() -> Result<ForkResult> {
    // SAFETY: the jail process is single-threaded (checked before it entered the jail and it
    // starts no thread), so no lock is held by a thread that does not exist in the child.
    unsafe { nix::unistd::fork() }.context("cannot fork the jail's first process")
}

/// Makes `fd` the child's descriptor `target` (`command` owns a duplicate until it spawns).
pub fn pass_fd(command: &mut Command, fd: &OwnedFd, target: RawFd) -> Result<()> {
    use std::os::fd::AsRawFd;
    let source = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and fcntl
    // (async-signal-safe system calls, no allocation). dup2 leaves the new descriptor without
    // FD_CLOEXEC; when source == target, the flag is cleared by hand.
    unsafe {
        command.pre_exec(move || {
            if source == target {
                let flags = nix::libc::fcntl(source, nix::libc::F_GETFD);
                if flags < 0
                    || nix::libc::fcntl(source, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if nix::libc::dup2(source, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Takes over descriptor `fd`, which the parent handed over (`run --listen-fd`), as a UDP
/// socket. Called once, at start-up, for a number nothing else in the process owns.
pub fn take_fd(fd: RawFd) -> Result<std::net::UdpSocket> {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    if fd < 3 {
        bail!("--listen-fd {fd} is one of the standard streams");
    }
    nix::fcntl::fcntl(
        // SAFETY: borrowed only for this call; the number is checked to be open (EBADF otherwise).
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .with_context(|| format!("--listen-fd {fd} is not an open file descriptor"))?;
    // SAFETY: the parent handed this descriptor over for this process to own; it is taken once,
    // at start-up, before anything else could have used or closed the number.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let kind =
        getsockopt(&owned, sockopt::SockType).with_context(|| format!("--listen-fd {fd} is not a socket"))?;
    if kind != SockType::Datagram {
        bail!("--listen-fd {fd} is not a UDP socket");
    }
    nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
    Ok(std::net::UdpSocket::from(owned))
}
