CREATE TABLE IF NOT EXISTS integrations (
    name        TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
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
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, not_before, lease_expires_at);
CREATE TABLE IF NOT EXISTS access_requests (
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
    revoke_requested  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS access_due ON access_requests (state, expires_at);
CREATE TABLE IF NOT EXISTS managed_users (
    integration       TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    next_rotation_at  INTEGER,
    cleanup_at        INTEGER,
    PRIMARY KEY (integration, user_id)
);
CREATE TABLE IF NOT EXISTS resources (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    object  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS resources_job ON resources (job_id, seq);
