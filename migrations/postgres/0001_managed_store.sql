-- The managed flag store: environments, flag sets, flags, segments, API keys, config versions
-- (with the change history they are diffed and rolled back from), the audit log and the outbox.
--
-- Times are timestamptz; JSON is `json` (stored as the store wrote it).
-- Every configuration row carries `version`, its ETag for optimistic concurrency. The audit log
-- names environments by key, not by reference, so it outlives what it describes.

CREATE TABLE environments (
    id             BIGSERIAL PRIMARY KEY,
    key            TEXT NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    config_version BIGINT NOT NULL DEFAULT 0,
    version        BIGINT NOT NULL DEFAULT 1,
    created_by     TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_by     TEXT NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL
);

CREATE TABLE flag_sets (
    id             BIGSERIAL PRIMARY KEY,
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    key            TEXT NOT NULL,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    metadata       JSON NOT NULL DEFAULT '{}',
    version        BIGINT NOT NULL DEFAULT 1,
    created_by     TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_by     TEXT NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    UNIQUE (environment_id, key)
);

-- `definition` is flagd's flag object (state, variants, defaultVariant, targeting, metadata).
CREATE TABLE flags (
    id          BIGSERIAL PRIMARY KEY,
    flag_set_id BIGINT NOT NULL REFERENCES flag_sets (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    definition  JSON NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    owner       TEXT NOT NULL DEFAULT '',
    tags        JSON NOT NULL DEFAULT '[]',
    version     BIGINT NOT NULL DEFAULT 1,
    created_by  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (flag_set_id, key)
);

-- flagd's `$evaluators`: named rules that targeting reaches with `{"$ref": "<key>"}`.
CREATE TABLE segments (
    id          BIGSERIAL PRIMARY KEY,
    flag_set_id BIGINT NOT NULL REFERENCES flag_sets (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    rule        JSON NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    version     BIGINT NOT NULL DEFAULT 1,
    created_by  TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    UNIQUE (flag_set_id, key)
);

-- One row per published configuration of an environment, numbered 1, 2, … and never changed.
CREATE TABLE config_versions (
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    version        BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    summary        TEXT NOT NULL,
    PRIMARY KEY (environment_id, version)
);

-- What each config version changed: the new body of a flag set, flag or segment (NULL: deleted).
-- The body of an entity at version V is that of its last change at or before V.
CREATE TABLE config_changes (
    environment_id BIGINT NOT NULL,
    version        BIGINT NOT NULL,
    flag_set       TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('flag_set', 'flag', 'segment')),
    key            TEXT NOT NULL,
    body           JSON,
    PRIMARY KEY (environment_id, flag_set, kind, key, version),
    FOREIGN KEY (environment_id, version) REFERENCES config_versions (environment_id, version) ON DELETE CASCADE
);
CREATE INDEX config_changes_by_version ON config_changes (environment_id, version);

CREATE TABLE audit_log (
    id             BIGSERIAL PRIMARY KEY,
    at             TIMESTAMPTZ NOT NULL,
    actor          TEXT NOT NULL,
    action         TEXT NOT NULL,
    environment    TEXT,
    entity_kind    TEXT NOT NULL,
    entity         TEXT NOT NULL,
    config_version BIGINT,
    before         JSON,
    after          JSON
);
CREATE INDEX audit_log_by_entity ON audit_log (entity_kind, entity, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX audit_log_by_environment ON audit_log (environment, id);

-- Keys are shown once and stored as the SHA-256 of the whole key; `prefix` is its public part.
CREATE TABLE api_keys (
    id             BIGSERIAL PRIMARY KEY,
    prefix         TEXT NOT NULL UNIQUE,
    hash           TEXT NOT NULL,
    name           TEXT NOT NULL,
    environment_id BIGINT REFERENCES environments (id) ON DELETE CASCADE,
    role           TEXT NOT NULL CHECK (role IN ('admin', 'evaluate', 'track')),
    created_by     TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    revoked_at     TIMESTAMPTZ,
    CHECK (environment_id IS NOT NULL OR role = 'admin')
);

-- Written in the same transaction as the change it announces; a relay publishes and marks it.
CREATE TABLE outbox (
    id             BIGSERIAL PRIMARY KEY,
    environment    TEXT NOT NULL,
    config_version BIGINT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    published_at   TIMESTAMPTZ
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

-- The store's queries are written once for both backends (crates/vexil-store/queries.sql). They
-- bind times as milliseconds since the epoch and JSON as text, and read them back the same way,
-- through these four functions; on SQLite, which stores them so, the calls are taken out.
CREATE FUNCTION vx_ts(ms BIGINT) RETURNS TIMESTAMPTZ
    LANGUAGE sql IMMUTABLE STRICT AS 'SELECT to_timestamp(ms / 1000.0)';
CREATE FUNCTION vx_ms(at TIMESTAMPTZ) RETURNS BIGINT
    LANGUAGE sql IMMUTABLE STRICT AS 'SELECT (extract(epoch FROM at) * 1000)::BIGINT';
CREATE FUNCTION vx_json(body TEXT) RETURNS JSON
    LANGUAGE sql IMMUTABLE STRICT AS 'SELECT body::JSON';
CREATE FUNCTION vx_text(body JSON) RETURNS TEXT
    LANGUAGE sql IMMUTABLE STRICT AS 'SELECT body::TEXT';
