-- An endpoint pinned by an operator (FC-30), with a revision for conflict detection.

ALTER TABLE nodes ADD COLUMN pinned_endpoint TEXT;

ALTER TABLE nodes ADD COLUMN endpoint_revision INTEGER NOT NULL DEFAULT 0;
