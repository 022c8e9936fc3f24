-- What a desktop's guest agent last reported through its host's heartbeat (JSON: agent
-- version, host name, OS, kernel, addresses, session user and state, idle seconds), for the
-- admin console. NULL while no agent is connected. Shown, never trusted for decisions that
-- are not the guest's own business.
ALTER TABLE desktops ADD COLUMN guest TEXT;
