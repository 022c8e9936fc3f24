-- A host's identity towards the broker: the SHA-256 of the TLS client certificate it presented
-- when it registered (`pleiades-host serve` makes one once, in its state directory). Every host
-- API request of a host with a pin must come over a connection that presents that certificate,
-- so a stolen credential alone no longer works (security review). NULL: a host registered
-- before this migration, or over plain HTTP (`insecure_http`), whose identity rests on its
-- credential alone until an admin registers it again with a replacement token.
ALTER TABLE hosts ADD COLUMN client_cert_sha256 TEXT;
