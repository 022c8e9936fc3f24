-- A pool's USB auto-redirect rules: the client's USB devices that the client redirects by
-- itself as soon as it connects to one of the pool's desktops ('none', the default: no device,
-- 'all', or a comma-separated list of class=HH and VVVV:PPPP, stored as
-- pleiades_protocol::usb::UsbPolicy writes it). Connection files carry them (usb_auto), and the
-- pool's USB policy (usb, migration 0015) still decides what the host lets in.
ALTER TABLE pools ADD COLUMN usb_auto TEXT NOT NULL DEFAULT 'none';
