-- Tracked events (exposures, conversions, custom events): the raw rows experiment results are
-- aggregated from, and the ids that make their ingestion idempotent.
--
-- `events` is partitioned by `server_time`, one partition per UTC day, `events_pYYYYMMDD`, created
-- by the store when it first inserts into that day (and the day after); retention drops whole days.
-- Rows whose day has no partition land in `events_default`, a safety net that is normally empty.

CREATE TABLE events (
    environment TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('exposure', 'conversion', 'custom')),
    unit        TEXT NOT NULL,
    flag        TEXT,
    experiment  TEXT,
    variant     TEXT,
    metric      TEXT,
    value       DOUBLE PRECISION,
    properties  JSON NOT NULL DEFAULT '{}',
    client_time TIMESTAMPTZ,
    server_time TIMESTAMPTZ NOT NULL
) PARTITION BY RANGE (server_time);

CREATE TABLE events_default PARTITION OF events DEFAULT;

-- Results: each exposed unit's variants and first exposure, then the unit's events of a metric.
CREATE INDEX events_exposures ON events (environment, experiment, unit)
    INCLUDE (variant, server_time) WHERE kind = 'exposure';
CREATE INDEX events_metrics ON events (environment, metric, unit, server_time)
    INCLUDE (kind, value) WHERE metric IS NOT NULL;

-- Idempotency keys: a unique key of the partitioned table would have to include `server_time`, so
-- the ids live here, one row per stored event, until they are pruned.
CREATE TABLE event_ids (
    environment TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (environment, event_id)
);
CREATE INDEX event_ids_by_received ON event_ids (received_at);
