-- A pool's desktops lock their screen while no client is connected (their guest agent does it,
-- and unlocks it for the user's next connection): on by default, an admin may turn it off.
ALTER TABLE pools ADD COLUMN lock_on_disconnect BIGINT NOT NULL DEFAULT 1;
