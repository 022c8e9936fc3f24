-- Disks: an image's template is named by its content hash, which hosts check, and a desktop
-- remembers the image it was made from (a persistent desktop keeps it until it is recomposed)
-- and how much its own disk takes on its host.
ALTER TABLE images ADD COLUMN disk_sha256 TEXT;
ALTER TABLE desktops ADD COLUMN image_id TEXT;
ALTER TABLE desktops ADD COLUMN disk_bytes BIGINT;
