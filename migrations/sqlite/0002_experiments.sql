-- Experiments: attached to a flag of a flag set; `definition` is the whole experiment (status,
-- allocation, metrics, …) as the store versions and rolls it back. Keys are unique per
-- environment: tracked events name experiments by key. Experiment changes are config changes.

CREATE TABLE experiments (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    flag_set_id    INTEGER NOT NULL REFERENCES flag_sets (id) ON DELETE CASCADE,
    key            TEXT NOT NULL,
    definition     TEXT NOT NULL,
    version        INTEGER NOT NULL DEFAULT 1,
    created_by     TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_by     TEXT NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (environment_id, key)
);
CREATE INDEX experiments_by_flag_set ON experiments (flag_set_id, key);

-- SQLite cannot change a CHECK constraint: the table is rebuilt with `experiment` allowed.
CREATE TABLE config_changes_new (
    environment_id INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    flag_set       TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('flag_set', 'flag', 'segment', 'experiment')),
    key            TEXT NOT NULL,
    body           TEXT,
    PRIMARY KEY (environment_id, flag_set, kind, key, version),
    FOREIGN KEY (environment_id, version) REFERENCES config_versions (environment_id, version) ON DELETE CASCADE
);
INSERT INTO config_changes_new SELECT environment_id, version, flag_set, kind, key, body FROM config_changes;
DROP TABLE config_changes;
ALTER TABLE config_changes_new RENAME TO config_changes;
CREATE INDEX config_changes_by_version ON config_changes (environment_id, version);
