-- A pool's clipboard policy, a data loss prevention control that the host enforces: whether
-- its desktops' clipboards take content from the client (to the guest) and give content to it
-- (from the guest). Both on by default, an admin may turn either off.
ALTER TABLE pools ADD COLUMN clipboard_to_guest BIGINT NOT NULL DEFAULT 1;
ALTER TABLE pools ADD COLUMN clipboard_from_guest BIGINT NOT NULL DEFAULT 1;
-- The denials of a desktop's VM process already audited (`clipboard.denied`), per direction:
-- its host reports running totals since the process started, the broker audits what is new.
ALTER TABLE desktops ADD COLUMN clipboard_denied_to_guest BIGINT NOT NULL DEFAULT 0;
ALTER TABLE desktops ADD COLUMN clipboard_denied_from_guest BIGINT NOT NULL DEFAULT 0;
