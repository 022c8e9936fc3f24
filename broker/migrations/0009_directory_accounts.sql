-- Directory (LDAP, later OIDC) accounts and groups.
-- users.external_id: the source's stable name for the person (an LDAP entry's DN, an OIDC sub),
-- NULL for local accounts.
-- user_groups.source: 'local' (made by an administrator) or the identity source that made the
-- group when one of its members first signed in ('ldap'). A source's sign-in sets its users'
-- memberships of that source's groups only.
ALTER TABLE users ADD COLUMN external_id TEXT;
ALTER TABLE user_groups ADD COLUMN source TEXT NOT NULL DEFAULT 'local';
