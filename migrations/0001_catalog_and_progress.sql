-- Catalog, entitlements and resume positions served by internal-api.

CREATE TABLE contents (
    id                  text    PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    title               text    NOT NULL,
    duration_ms         bigint  NOT NULL CHECK (duration_ms >= 0),
    -- NULL means available everywhere; an empty array would mean nowhere.
    available_countries text[]  NULL,
    -- Empty means any plan may watch.
    required_plans      text[]  NOT NULL DEFAULT '{}'
);

CREATE TABLE streams (
    content_id  text     NOT NULL REFERENCES contents (id) ON DELETE CASCADE,
    -- Clients offer streams in this order.
    ordinal     integer  NOT NULL CHECK (ordinal >= 0),
    protocol    text     NOT NULL,
    path        text     NOT NULL,
    drm_system  text     NULL,
    drm_key_id  text     NULL,
    PRIMARY KEY (content_id, ordinal),
    -- A DRM-protected stream is unusable without its key id, and a key id
    -- without a system means nothing.
    CHECK ((drm_system IS NULL) = (drm_key_id IS NULL))
);

CREATE TABLE subtitles (
    content_id  text     NOT NULL REFERENCES contents (id) ON DELETE CASCADE,
    language    text     NOT NULL,
    path        text     NOT NULL,
    ordinal     integer  NOT NULL DEFAULT 0,
    PRIMARY KEY (content_id, language)
);

CREATE TABLE entitlements (
    user_id      text     PRIMARY KEY,
    plan         text     NOT NULL,
    max_streams  integer  NOT NULL CHECK (max_streams >= 0),
    active       boolean  NOT NULL DEFAULT true
);

-- No foreign keys on purpose: positions are keyed by the caller's ids, and a
-- batch must not fail as a whole because one title left the catalog or a
-- user has no entitlement row.
CREATE TABLE watch_progress (
    user_id      text         NOT NULL,
    content_id   text         NOT NULL,
    position_ms  bigint       NOT NULL CHECK (position_ms >= 0),
    updated_at   timestamptz  NOT NULL,
    PRIMARY KEY (user_id, content_id)
);
