-- Tracked events (exposures, conversions, custom events): the raw rows experiment results are
-- aggregated from, and the ids that make their ingestion idempotent.
--
-- Times are INTEGER milliseconds since the Unix epoch (UTC); properties are JSON text. (Postgres
-- partitions `events` by day; here retention deletes rows, by `events_by_time`.)

CREATE TABLE events (
    environment TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('exposure', 'conversion', 'custom')),
    unit        TEXT NOT NULL,
    flag        TEXT,
    experiment  TEXT,
    variant     TEXT,
    metric      TEXT,
    value       REAL,
    properties  TEXT NOT NULL DEFAULT '{}',
    client_time INTEGER,
    server_time INTEGER NOT NULL
);

-- Results: each exposed unit's variants and first exposure, then the unit's events of a metric
-- (both covering: the queries read nothing else).
CREATE INDEX events_exposures ON events (environment, experiment, unit, variant, server_time)
    WHERE kind = 'exposure';
CREATE INDEX events_metrics ON events (environment, metric, unit, server_time, kind, value)
    WHERE metric IS NOT NULL;
CREATE INDEX events_by_time ON events (server_time);

-- Idempotency keys, one row per stored event, until they are pruned.
CREATE TABLE event_ids (
    environment TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (environment, event_id)
) WITHOUT ROWID;
CREATE INDEX event_ids_by_received ON event_ids (received_at);
