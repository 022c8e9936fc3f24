-- One session server per VM process: a desktop's own UDP port, reported by its host's
-- heartbeats (NULL: the host's session_port).
ALTER TABLE desktops ADD COLUMN session_port BIGINT;
