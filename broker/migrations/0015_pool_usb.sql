-- A pool's USB policy, which the host enforces: which of the client's USB devices its desktops
-- take ('none', the default: no device at all, 'all', or a comma-separated list of class=HH
-- and VVVV:PPPP, stored as pleiades_protocol::usb::UsbPolicy writes it).
ALTER TABLE pools ADD COLUMN usb TEXT NOT NULL DEFAULT 'none';
-- The attaches and denials of a desktop's VM process already audited (`usb.attached`,
-- `usb.denied`): its host reports running totals since the process started, the broker audits
-- what is new.
ALTER TABLE desktops ADD COLUMN usb_attached BIGINT NOT NULL DEFAULT 0;
ALTER TABLE desktops ADD COLUMN usb_denied BIGINT NOT NULL DEFAULT 0;
