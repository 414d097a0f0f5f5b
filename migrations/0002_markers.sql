-- Skippable parts of a title (CONTRACT section 7, "Markers"), so players can
-- offer "skip intro" and "next episode".

CREATE TABLE markers (
    content_id  text    NOT NULL REFERENCES contents (id) ON DELETE CASCADE,
    -- Moneta and players switch on these values; anything else would be
    -- served to them as a type they cannot handle. "C" makes the serving
    -- order byte order, the same whatever the database's default collation.
    type        text    COLLATE "C" NOT NULL
                        CHECK (type IN ('intro', 'recap', 'credits', 'preview')),
    start_ms    bigint  NOT NULL CHECK (start_ms >= 0),
    -- 2^53 - 1, as for positions: a larger value would lose precision in a
    -- JSON client reading it.
    end_ms      bigint  NOT NULL CHECK (end_ms <= 9007199254740991),
    CHECK (start_ms < end_ms),
    -- Also the order markers are served in (start_ms, then type), so that
    -- order is total and an index serves it.
    PRIMARY KEY (content_id, start_ms, type)
);
