-- The managed flag store: environments, flag sets, flags, segments, API keys, config versions
-- (with the change history they are diffed and rolled back from), the audit log and the outbox.
--
-- Times are INTEGER milliseconds since the Unix epoch (UTC); JSON is TEXT. Every configuration
-- row carries `version`, its ETag for optimistic concurrency. The audit log names environments by
-- key, not by reference, so it outlives what it describes.

CREATE TABLE environments (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    key            TEXT NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    config_version INTEGER NOT NULL DEFAULT 0,
    version        INTEGER NOT NULL DEFAULT 1,
    created_by     TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_by     TEXT NOT NULL,
    updated_at     INTEGER NOT NULL
);

CREATE TABLE flag_sets (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    key            TEXT NOT NULL,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    metadata       TEXT NOT NULL DEFAULT '{}',
    version        INTEGER NOT NULL DEFAULT 1,
    created_by     TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_by     TEXT NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (environment_id, key)
);

-- `definition` is flagd's flag object (state, variants, defaultVariant, targeting, metadata).
CREATE TABLE flags (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    flag_set_id INTEGER NOT NULL REFERENCES flag_sets (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    definition  TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    owner       TEXT NOT NULL DEFAULT '',
    tags        TEXT NOT NULL DEFAULT '[]',
    version     INTEGER NOT NULL DEFAULT 1,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (flag_set_id, key)
);

-- flagd's `$evaluators`: named rules that targeting reaches with `{"$ref": "<key>"}`.
CREATE TABLE segments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    flag_set_id INTEGER NOT NULL REFERENCES flag_sets (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    rule        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    version     INTEGER NOT NULL DEFAULT 1,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_by  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (flag_set_id, key)
);

-- One row per published configuration of an environment, numbered 1, 2, … and never changed.
CREATE TABLE config_versions (
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    version        INTEGER NOT NULL,
    created_by     TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    summary        TEXT NOT NULL,
    PRIMARY KEY (environment_id, version)
);

-- What each config version changed: the new body of a flag set, flag or segment (NULL: deleted).
-- The body of an entity at version V is that of its last change at or before V.
CREATE TABLE config_changes (
    environment_id INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    flag_set       TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('flag_set', 'flag', 'segment')),
    key            TEXT NOT NULL,
    body           TEXT,
    PRIMARY KEY (environment_id, flag_set, kind, key, version),
    FOREIGN KEY (environment_id, version) REFERENCES config_versions (environment_id, version) ON DELETE CASCADE
);
CREATE INDEX config_changes_by_version ON config_changes (environment_id, version);

CREATE TABLE audit_log (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at             INTEGER NOT NULL,
    actor          TEXT NOT NULL,
    action         TEXT NOT NULL,
    environment    TEXT,
    entity_kind    TEXT NOT NULL,
    entity         TEXT NOT NULL,
    config_version INTEGER,
    before         TEXT,
    after          TEXT
);
CREATE INDEX audit_log_by_entity ON audit_log (entity_kind, entity, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
CREATE INDEX audit_log_by_environment ON audit_log (environment, id);

-- Keys are shown once and stored as the SHA-256 of the whole key; `prefix` is its public part.
CREATE TABLE api_keys (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    prefix         TEXT NOT NULL UNIQUE,
    hash           TEXT NOT NULL,
    name           TEXT NOT NULL,
    environment_id INTEGER REFERENCES environments (id) ON DELETE CASCADE,
    role           TEXT NOT NULL CHECK (role IN ('admin', 'evaluate', 'track')),
    created_by     TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    revoked_at     INTEGER,
    CHECK (environment_id IS NOT NULL OR role = 'admin')
);

-- Written in the same transaction as the change it announces; a relay publishes and marks it.
CREATE TABLE outbox (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    environment    TEXT NOT NULL,
    config_version INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    published_at   INTEGER
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;
