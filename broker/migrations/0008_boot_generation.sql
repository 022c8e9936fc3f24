-- A desktop's generation counts the starts of its VM (start, restart, recycle, and no longer
-- allocations), and each such command carries the generation it starts: the host gives it to
-- the VM process, and tickets name it, so a ticket issued before a recycle (another user's)
-- does not open the desktop's next process (security review). NULL: a command that starts
-- nothing, or one queued before this migration.
ALTER TABLE host_commands ADD COLUMN generation BIGINT;
