-- The artifact kind a repository's conversions make (issue 18): 'chunked' (the content in
-- chunks, a copy of the image) or 'index' (an index over the original gzip layers). Existing
-- repositories keep making chunked artifacts.
ALTER TABLE repositories
    ADD COLUMN kind text NOT NULL DEFAULT 'chunked'
    CONSTRAINT repositories_kind CHECK (kind IN ('chunked', 'index'));
