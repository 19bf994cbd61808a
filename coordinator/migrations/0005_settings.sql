-- Facts fixed at the first start of a data directory (the trust domain), one row each.

CREATE TABLE settings (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
