-- The first schema. Times are Unix seconds unless the column says _ms.

CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE networks (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    cidr TEXT NOT NULL UNIQUE,
    cidr6 TEXT NOT NULL,
    zero_trust INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    network_id INTEGER NOT NULL REFERENCES networks(id),
    namespace TEXT NOT NULL,
    tags TEXT NOT NULL,
    uses INTEGER NOT NULL CHECK (uses >= 1),
    uses_left INTEGER NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses),
    expires_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE nodes (
    id INTEGER PRIMARY KEY,
    network_id INTEGER NOT NULL REFERENCES networks(id),
    name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    tags TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    public_key TEXT NOT NULL,
    -- Host offset inside the network's prefixes; never reused, so no address is issued twice.
    addr_offset INTEGER NOT NULL CHECK (addr_offset >= 1),
    ipv4 TEXT NOT NULL UNIQUE,
    ipv6 TEXT NOT NULL UNIQUE,
    token_id TEXT REFERENCES tokens(id),
    listen_port INTEGER NOT NULL DEFAULT 0,
    endpoints TEXT NOT NULL DEFAULT '[]',
    version TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'deleted')),
    netmap_version INTEGER NOT NULL DEFAULT 0,
    netmap_json TEXT,
    applied_version INTEGER NOT NULL DEFAULT 0,
    applied_at INTEGER,
    last_seen INTEGER,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER,
    UNIQUE (network_id, addr_offset)
);

CREATE UNIQUE INDEX nodes_active_name ON nodes (network_id, name) WHERE state = 'active';
CREATE UNIQUE INDEX nodes_active_key ON nodes (public_key) WHERE state = 'active';

CREATE TABLE node_certs (
    serial TEXT PRIMARY KEY,
    node_id INTEGER NOT NULL REFERENCES nodes(id),
    not_after INTEGER NOT NULL
);

CREATE TABLE policies (
    network_id INTEGER NOT NULL REFERENCES networks(id),
    version INTEGER NOT NULL CHECK (version >= 1),
    source TEXT NOT NULL,
    applied_at INTEGER NOT NULL,
    applied_by TEXT NOT NULL,
    PRIMARY KEY (network_id, version)
);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    network_id INTEGER REFERENCES networks(id),
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);

CREATE INDEX audit_network ON audit (network_id, id);
