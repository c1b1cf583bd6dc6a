-- The SQLite schema as builds with schema version 3 wrote it (for the v3 -> v4 migration test).
CREATE TABLE integrations (
    name        TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    source      TEXT NOT NULL DEFAULT 'config'
);
CREATE TABLE jobs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    kind              TEXT NOT NULL,
    integration_name  TEXT,
    integration       TEXT,
    params            TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempt           INTEGER NOT NULL,
    lease_token       TEXT,
    lease_expires_at  INTEGER,
    not_before        INTEGER,
    completed_token   TEXT,
    result            TEXT,
    error             TEXT,
    access_id         TEXT,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);
CREATE INDEX jobs_ready ON jobs (state, not_before, lease_expires_at);
CREATE TABLE access_requests (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    integration       TEXT NOT NULL,
    subject           TEXT NOT NULL,
    role              TEXT NOT NULL,
    resource          TEXT NOT NULL,
    ttl_seconds       INTEGER NOT NULL,
    create_user       INTEGER NOT NULL,
    state             TEXT NOT NULL,
    created_at        INTEGER NOT NULL,
    granted_at        INTEGER,
    expires_at        INTEGER,
    revoked_at        INTEGER,
    grant_job_id      TEXT NOT NULL,
    revoke_job_id     TEXT,
    user_id           TEXT,
    binding_ids       TEXT NOT NULL,
    access_details    TEXT,
    last_error        TEXT,
    revoke_requested  INTEGER NOT NULL DEFAULT 0,
    integration_spec  TEXT,
    pre_existing      INTEGER NOT NULL DEFAULT 0,
    bound_subject     TEXT,
    owner             TEXT,
    note              TEXT
);
CREATE INDEX access_due ON access_requests (state, expires_at);
CREATE INDEX access_key ON access_requests (integration, role, resource, state);
CREATE INDEX access_binding ON access_requests (role, resource, state);
CREATE INDEX jobs_access ON jobs (access_id, kind, state);
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE managed_users (
    integration       TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    next_rotation_at  INTEGER,
    cleanup_at        INTEGER,
    PRIMARY KEY (integration, user_id)
);
CREATE TABLE resources (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    object  TEXT NOT NULL
);
CREATE INDEX resources_job ON resources (job_id, seq);
