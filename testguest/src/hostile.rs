//! Hostile mode (placeholder).
use crate::pci::Bus;
use crate::report::Errors;
use crate::virtio::VirtioPci;
use core::fmt;
#[derive(Debug)]
pub struct HostileReport;
impl HostileReport {
    pub fn write_json(&self, out: &mut impl fmt::Write) -> fmt::Result {
        out.write_str("{}")
    }
}
pub fn run(_bus: &Bus, _devices: &mut [Option<VirtioPci>], _errors: &mut Errors) -> HostileReport {
    HostileReport
}
