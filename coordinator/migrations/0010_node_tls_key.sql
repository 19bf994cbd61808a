-- The node's TLS key on record (issue 5): the lowercase hex SHA-256 of the SubjectPublicKeyInfo
-- of the node certificate last issued to it, at enrollment and at every renewal. A renewal-only
-- session (an expired node certificate, FC-22) is accepted only for a certificate with this key.
-- NULL for nodes enrolled before this migration: they fall back to the serial check (with a
-- warning) and the hash is filled in from their next session or renewal on.

ALTER TABLE nodes ADD COLUMN tls_spki_sha256 TEXT;
