-- Node revocation (issue 6). A revoked node keeps its row with state 'deleted' (the CHECK of
-- 0001 allows no other value, and rebuilding the table would rewrite every foreign key), and
-- revoked_at marks it revoked: the store reports such a node as state `revoked`. Its WireGuard
-- key stays refused for any new enrollment.

ALTER TABLE nodes ADD COLUMN revoked_at INTEGER;

ALTER TABLE nodes ADD COLUMN revoke_reason TEXT;

CREATE INDEX nodes_revoked_key ON nodes (public_key) WHERE revoked_at IS NOT NULL;
