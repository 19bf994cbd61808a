-- Workload registrations (issue 5): which SPIFFE ID a node may have signed for which callers.
-- A deleted node's registrations stay as rows but are never issued: issuance joins on an
-- active node.

CREATE TABLE workloads (
    id INTEGER PRIMARY KEY,
    network_id INTEGER NOT NULL REFERENCES networks(id),
    node_id INTEGER NOT NULL REFERENCES nodes(id),
    spiffe_id TEXT NOT NULL,
    -- JSON array of selector strings, sorted.
    selectors TEXT NOT NULL,
    ttl_secs INTEGER NOT NULL CHECK (ttl_secs >= 10),
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (node_id, spiffe_id)
);

CREATE INDEX workloads_network ON workloads (network_id);
