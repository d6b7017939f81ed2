-- Every query of the managed store, for both backends. Each starts with `-- name: <name>`.
--
-- Times are bound and read as milliseconds since the epoch, JSON as text, through `vx_ts`, `vx_ms`,
-- `vx_json` and `vx_text`: SQL functions on Postgres (migrations/postgres), taken out of the text on
-- SQLite, which stores both as they are bound. Parameters are `$1`, `$2`, … on both.

-- name: environment_lock
-- The first statement of every write to an environment's configuration: publishes its next config
-- version and holds the row (Postgres) or the database (SQLite) until the transaction ends, so
-- writers to one environment take their turns.
UPDATE environments SET config_version = config_version + 1 WHERE key = $1 RETURNING id, config_version;

-- name: environment_id
SELECT id, config_version FROM environments WHERE key = $1;

-- name: environment_insert
INSERT INTO environments (key, name, description, created_by, created_at, updated_by, updated_at)
VALUES ($1, $2, $3, $4, vx_ts($5), $4, vx_ts($5))
ON CONFLICT (key) DO NOTHING
RETURNING id;

-- name: environment_select
SELECT key, name, description, config_version, version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM environments WHERE key = $1;

-- name: environment_list
SELECT key, name, description, config_version, version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM environments WHERE key > $1 ORDER BY key LIMIT $2;

-- name: environment_update
UPDATE environments SET name = $2, description = $3, version = version + 1, updated_by = $4, updated_at = vx_ts($5)
WHERE key = $1;

-- name: environment_delete
DELETE FROM environments WHERE key = $1;

-- name: environment_versions
SELECT key, config_version FROM environments ORDER BY key;

-- name: flag_set_select
SELECT id, key, name, description, vx_text(metadata), version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM flag_sets WHERE environment_id = $1 AND key = $2;

-- name: flag_set_list
SELECT id, key, name, description, vx_text(metadata), version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM flag_sets WHERE environment_id = $1 AND key > $2 ORDER BY key LIMIT $3;

-- name: flag_set_insert
INSERT INTO flag_sets (environment_id, key, name, description, metadata, created_by, created_at, updated_by, updated_at)
VALUES ($1, $2, $3, $4, vx_json($5), $6, vx_ts($7), $6, vx_ts($7))
RETURNING id;

-- name: flag_set_update
UPDATE flag_sets SET name = $3, description = $4, metadata = vx_json($5), version = version + 1,
    updated_by = $6, updated_at = vx_ts($7)
WHERE environment_id = $1 AND key = $2;

-- name: flag_set_delete
DELETE FROM flag_sets WHERE environment_id = $1 AND key = $2;

-- name: flag_select
SELECT key, vx_text(definition), description, owner, vx_text(tags), version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM flags WHERE flag_set_id = $1 AND key = $2;

-- name: flag_list
SELECT key, vx_text(definition), description, owner, vx_text(tags), version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM flags WHERE flag_set_id = $1 AND key > $2 ORDER BY key LIMIT $3;

-- name: flag_insert
INSERT INTO flags (flag_set_id, key, definition, description, owner, tags, created_by, created_at, updated_by, updated_at)
VALUES ($1, $2, vx_json($3), $4, $5, vx_json($6), $7, vx_ts($8), $7, vx_ts($8));

-- name: flag_update
UPDATE flags SET definition = vx_json($3), description = $4, owner = $5, tags = vx_json($6), version = version + 1,
    updated_by = $7, updated_at = vx_ts($8)
WHERE flag_set_id = $1 AND key = $2;

-- name: flag_delete
DELETE FROM flags WHERE flag_set_id = $1 AND key = $2;

-- name: segment_select
SELECT key, vx_text(rule), description, version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM segments WHERE flag_set_id = $1 AND key = $2;

-- name: segment_list
SELECT key, vx_text(rule), description, version, created_by, vx_ms(created_at), updated_by, vx_ms(updated_at)
FROM segments WHERE flag_set_id = $1 AND key > $2 ORDER BY key LIMIT $3;

-- name: segment_insert
INSERT INTO segments (flag_set_id, key, rule, description, created_by, created_at, updated_by, updated_at)
VALUES ($1, $2, vx_json($3), $4, $5, vx_ts($6), $5, vx_ts($6));

-- name: segment_update
UPDATE segments SET rule = vx_json($3), description = $4, version = version + 1, updated_by = $5, updated_at = vx_ts($6)
WHERE flag_set_id = $1 AND key = $2;

-- name: segment_delete
DELETE FROM segments WHERE flag_set_id = $1 AND key = $2;

-- name: snapshot_flag_sets
SELECT key, vx_text(metadata) FROM flag_sets WHERE environment_id = $1 ORDER BY key;

-- name: snapshot_flags
SELECT s.key, f.key, vx_text(f.definition)
FROM flags f JOIN flag_sets s ON s.id = f.flag_set_id
WHERE s.environment_id = $1 ORDER BY s.key, f.key;

-- name: snapshot_segments
SELECT s.key, g.key, vx_text(g.rule)
FROM segments g JOIN flag_sets s ON s.id = g.flag_set_id
WHERE s.environment_id = $1 ORDER BY s.key, g.key;

-- name: version_insert
INSERT INTO config_versions (environment_id, version, created_by, created_at, summary)
VALUES ($1, $2, $3, vx_ts($4), $5);

-- name: version_list
-- Newest first: `$2` is the version the previous page ended before.
SELECT version, created_by, vx_ms(created_at), summary
FROM config_versions WHERE environment_id = $1 AND version < $2 ORDER BY version DESC LIMIT $3;

-- name: change_insert
INSERT INTO config_changes (environment_id, version, flag_set, kind, key, body)
VALUES ($1, $2, $3, $4, $5, vx_json($6));

-- name: changes_between
-- The entities changed after version $2, up to version $3.
SELECT DISTINCT flag_set, kind, key FROM config_changes
WHERE environment_id = $1 AND version > $2 AND version <= $3;

-- name: version_changes
-- Every change after version $2 up to version $3, in the order they were published.
SELECT version, flag_set, kind, key, vx_text(body) FROM config_changes
WHERE environment_id = $1 AND version > $2 AND version <= $3
ORDER BY version, flag_set, kind, key;

-- name: state_at
-- The body at version $2 of each entity changed after version $3 up to $4: that of its last change
-- at or before $2 (NULL: deleted by then). An entity with no change at or before $2 has no row.
-- Only the changed entities are visited (by the version index), not the whole history.
SELECT c.flag_set, c.kind, c.key, vx_text(c.body)
FROM (SELECT DISTINCT flag_set, kind, key FROM config_changes
      WHERE environment_id = $1 AND version > $3 AND version <= $4) n
JOIN config_changes c
  ON c.environment_id = $1 AND c.flag_set = n.flag_set AND c.kind = n.kind AND c.key = n.key
WHERE c.version = (
    SELECT max(p.version) FROM config_changes p
    WHERE p.environment_id = $1 AND p.flag_set = n.flag_set AND p.kind = n.kind AND p.key = n.key
      AND p.version <= $2);

-- name: audit_insert
INSERT INTO audit_log (at, actor, action, environment, entity_kind, entity, config_version, before, after)
VALUES (vx_ts($1), $2, $3, $4, $5, $6, $7, vx_json($8), vx_json($9));

-- name: audit_list
-- Newest first: `$1` is the id the previous page ended before. A filter parameter that is NULL
-- matches everything; `$4` matches an entity and everything under it.
SELECT id, vx_ms(at), actor, action, environment, entity_kind, entity, config_version, vx_text(before), vx_text(after)
FROM audit_log
WHERE id < $1
  AND ($2 IS NULL OR environment = $2)
  AND ($3 IS NULL OR entity_kind = $3)
  AND ($4 IS NULL OR entity = $4 OR substr(entity, 1, length($4) + 1) = $4 || '/')
  AND ($5 IS NULL OR actor = $5)
  AND ($6 IS NULL OR at >= vx_ts($6))
  AND ($7 IS NULL OR at < vx_ts($7))
ORDER BY id DESC LIMIT $8;

-- name: api_key_insert
INSERT INTO api_keys (prefix, hash, name, environment_id, role, created_by, created_at)
VALUES ($1, $2, $3, $4, $5, $6, vx_ts($7))
RETURNING id;

-- name: api_key_by_prefix
SELECT k.id, k.prefix, k.name, e.key, k.role, k.created_by, vx_ms(k.created_at), vx_ms(k.revoked_at), k.hash
FROM api_keys k LEFT JOIN environments e ON e.id = k.environment_id
WHERE k.prefix = $1;

-- name: api_key_by_id
SELECT k.id, k.prefix, k.name, e.key, k.role, k.created_by, vx_ms(k.created_at), vx_ms(k.revoked_at), k.hash
FROM api_keys k LEFT JOIN environments e ON e.id = k.environment_id
WHERE k.id = $1;

-- name: api_key_list
SELECT k.id, k.prefix, k.name, e.key, k.role, k.created_by, vx_ms(k.created_at), vx_ms(k.revoked_at), k.hash
FROM api_keys k LEFT JOIN environments e ON e.id = k.environment_id
WHERE k.id > $1 AND ($2 IS NULL OR e.key = $2)
ORDER BY k.id LIMIT $3;

-- name: api_key_revoke
UPDATE api_keys SET revoked_at = vx_ts($2) WHERE id = $1 AND revoked_at IS NULL;

-- name: api_key_count
SELECT count(*) FROM api_keys WHERE revoked_at IS NULL;

-- name: outbox_insert
INSERT INTO outbox (environment, config_version, created_at) VALUES ($1, $2, vx_ts($3));

-- name: outbox_pending
-- Rows written before $2 not published yet, oldest first.
SELECT id, environment, config_version FROM outbox
WHERE published_at IS NULL AND created_at <= vx_ts($2) ORDER BY id LIMIT $1;

-- name: outbox_mark
UPDATE outbox SET published_at = vx_ts($2) WHERE id = $1;

-- name: outbox_prune
DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at <= vx_ts($1);

-- name: notify
-- Postgres only: wakes every server listening on `vexil_config` when the transaction commits.
SELECT pg_notify('vexil_config', $1);

-- name: experiment_select
SELECT s.key, e.key, vx_text(e.definition), e.version, e.created_by, vx_ms(e.created_at), e.updated_by, vx_ms(e.updated_at)
FROM experiments e JOIN flag_sets s ON s.id = e.flag_set_id
WHERE e.environment_id = $1 AND e.key = $2;

-- name: experiment_list
SELECT s.key, e.key, vx_text(e.definition), e.version, e.created_by, vx_ms(e.created_at), e.updated_by, vx_ms(e.updated_at)
FROM experiments e JOIN flag_sets s ON s.id = e.flag_set_id
WHERE e.environment_id = $1 AND e.key > $2 ORDER BY e.key LIMIT $3;

-- name: experiment_insert
INSERT INTO experiments (environment_id, flag_set_id, key, definition, created_by, created_at, updated_by, updated_at)
VALUES ($1, $2, $3, vx_json($4), $5, vx_ts($6), $5, vx_ts($6));

-- name: experiment_update
UPDATE experiments SET definition = vx_json($3), version = version + 1, updated_by = $4, updated_at = vx_ts($5)
WHERE environment_id = $1 AND key = $2;

-- name: experiment_delete
DELETE FROM experiments WHERE environment_id = $1 AND key = $2;

-- name: experiments_of_set
SELECT s.key, e.key, vx_text(e.definition), e.version, e.created_by, vx_ms(e.created_at), e.updated_by, vx_ms(e.updated_at)
FROM experiments e JOIN flag_sets s ON s.id = e.flag_set_id
WHERE e.flag_set_id = $1 ORDER BY e.key;

-- name: snapshot_experiments
SELECT s.key, e.key, vx_text(e.definition)
FROM experiments e JOIN flag_sets s ON s.id = e.flag_set_id
WHERE e.environment_id = $1 ORDER BY s.key, e.key;
