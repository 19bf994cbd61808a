-- Posture and quarantine (issue 6), and the measured time to enforcement of audited changes.
-- One row per node that reported posture or was judged by a [[posture]] entry: its last report
-- (NULL before any), the control session that sent it, and its quarantine, if any.

CREATE TABLE node_posture (
    node_id INTEGER PRIMARY KEY REFERENCES nodes(id),
    report_json TEXT,
    reported_at INTEGER,
    session_key TEXT,
    session_started_at INTEGER,
    quarantine TEXT,
    quarantined_at INTEGER
);

-- JSON of ztnet_proto::admin::Enforcement, filled in once the affected peers acknowledged.
ALTER TABLE audit ADD COLUMN enforcement TEXT;

-- Several admin API keys (issue 6): a revoked key keeps its row (and its name) and is refused.
ALTER TABLE api_keys ADD COLUMN created_by TEXT NOT NULL DEFAULT 'coordinator';

ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;

ALTER TABLE api_keys ADD COLUMN revoked_by TEXT;
