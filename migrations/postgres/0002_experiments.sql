-- Experiments: attached to a flag of a flag set; `definition` is the whole experiment (status,
-- allocation, metrics, …) as the store versions and rolls it back. Keys are unique per
-- environment: tracked events name experiments by key. Experiment changes are config changes.

CREATE TABLE experiments (
    id             BIGSERIAL PRIMARY KEY,
    environment_id BIGINT NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    flag_set_id    BIGINT NOT NULL REFERENCES flag_sets (id) ON DELETE CASCADE,
    key            TEXT NOT NULL,
    definition     JSON NOT NULL,
    version        BIGINT NOT NULL DEFAULT 1,
    created_by     TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_by     TEXT NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    UNIQUE (environment_id, key)
);
CREATE INDEX experiments_by_flag_set ON experiments (flag_set_id, key);

ALTER TABLE config_changes DROP CONSTRAINT config_changes_kind_check;
ALTER TABLE config_changes ADD CONSTRAINT config_changes_kind_check
    CHECK (kind IN ('flag_set', 'flag', 'segment', 'experiment'));
