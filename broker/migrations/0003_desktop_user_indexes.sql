-- A user's desktop is looked up by user_id or owner_id on every request and allocation: without
-- these, each lookup scanned the pool (the allocation benchmark's cost grew with pool size).
CREATE INDEX desktops_by_user ON desktops (user_id);
CREATE INDEX desktops_by_owner ON desktops (owner_id);
