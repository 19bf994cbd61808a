-- Node names become unique case-insensitively (FC-29): `db1` and `DB1` may not both be active.
-- Names are ASCII (`[A-Za-z0-9-]`), so lower() is the whole folding; NFC changes nothing.
-- The migration runs in one transaction: if the index cannot be built because two active
-- nodes clash, the column added above is rolled back too.

ALTER TABLE nodes ADD COLUMN name_key TEXT NOT NULL DEFAULT '';

UPDATE nodes SET name_key = lower(name);

DROP INDEX nodes_active_name;

CREATE UNIQUE INDEX nodes_active_name_key ON nodes (network_id, name_key) WHERE state = 'active';
