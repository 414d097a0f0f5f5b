-- A stop may mark a title completed (CONTRACT section 7, "Resume and
-- watched"): it counts as watched whatever the position. The mark belongs to
-- the write that wins, so a later write without it (the title is being
-- watched again) clears it.

ALTER TABLE watch_progress ADD COLUMN completed boolean NOT NULL DEFAULT false;
