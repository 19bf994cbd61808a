-- Node key expiry and rotation (issue 6). A zero-trust network's node keys live key_ttl_secs
-- (24 h unless changed with `ztnet network set --key-ttl`); a node's key was made at
-- key_created_at. next_public_key is the key a node proposed and its peers are learning, until
-- it switches.
--
-- Keys that exist when this runs get a full life from now, not from their enrollment: an
-- upgrade must not expire every key older than a day at once (nodes that cannot rotate yet
-- would drop out of every netmap).

ALTER TABLE networks ADD COLUMN key_ttl_secs INTEGER NOT NULL DEFAULT 86400;

ALTER TABLE nodes ADD COLUMN key_created_at INTEGER;

ALTER TABLE nodes ADD COLUMN next_public_key TEXT;

UPDATE nodes SET key_created_at = CAST(strftime('%s', 'now') AS INTEGER);
