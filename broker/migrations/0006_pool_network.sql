-- Networks: a pool's desktops get a network card with DHCP, DNS and outbound NAT ('nat', the
-- default) or none ('none'), and may reach the host's loopback services on the listed TCP ports
-- (comma-separated), and nothing else of the host.
ALTER TABLE pools ADD COLUMN network TEXT NOT NULL DEFAULT 'nat';
ALTER TABLE pools ADD COLUMN host_ports TEXT NOT NULL DEFAULT '';
