-- Desktops that fail to start (or whose VM dies) are retried in place with a growing delay,
-- and the host's reason is kept where the admin console and the API show it. A failed
-- desktop still counts against its pool's maximum: a pool whose image cannot start keeps
-- max_size rows, not one new row per attempt.
ALTER TABLE desktops ADD COLUMN last_error TEXT;
ALTER TABLE desktops ADD COLUMN start_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE desktops ADD COLUMN retry_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN last_error TEXT;
