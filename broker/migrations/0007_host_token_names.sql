-- A registration token is made for one host name, and only a token made to replace a host may
-- register a name that is already registered (security review: any token could take an
-- existing host's identity). Tokens from before this migration name no host: they register
-- new names only.
ALTER TABLE host_tokens ADD COLUMN host_name TEXT;
ALTER TABLE host_tokens ADD COLUMN replace_host BIGINT NOT NULL DEFAULT 0;
