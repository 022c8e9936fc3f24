-- A pool's file-transfer policy, a data loss prevention control that the host enforces:
-- whether its desktops take files that the client sends (into the guest's Downloads). On by
-- default, an admin may turn it off.
ALTER TABLE pools ADD COLUMN file_transfer BIGINT NOT NULL DEFAULT 1;
-- The denials of a desktop's VM process already audited (`files.denied`): its host reports
-- running totals since the process started, the broker audits what is new.
ALTER TABLE desktops ADD COLUMN files_denied BIGINT NOT NULL DEFAULT 0;
