-- streamsnap serve: the conversion service's state, shared by its replicas.
-- Records are the API's JSON (doc); the columns beside them are what queries select on.

CREATE TABLE repositories (
    name text PRIMARY KEY,
    doc jsonb NOT NULL
);

CREATE SEQUENCE operation_seq;

CREATE TABLE operations (
    id text PRIMARY KEY,
    -- creation order: the queue order
    seq bigint NOT NULL UNIQUE,
    repository text NOT NULL,
    manifest_digest text NOT NULL,
    state text NOT NULL,
    -- the replica running it (or that last ran it)
    worker text,
    -- while Running: when its worker's lease ends, in ms since the epoch (database clock)
    lease_until bigint,
    doc jsonb NOT NULL
);
CREATE INDEX operations_queue ON operations (seq) WHERE state = 'NotStarted';
CREATE INDEX operations_leases ON operations (lease_until) WHERE state = 'Running';
CREATE INDEX operations_by_repository ON operations (repository, seq);

-- the newest operation of each manifest, for deduplication
CREATE TABLE latest_by_manifest (
    repository text NOT NULL,
    manifest_digest text NOT NULL,
    operation_id text NOT NULL REFERENCES operations (id),
    PRIMARY KEY (repository, manifest_digest)
);

-- registry event IDs already handled (redeliveries create nothing), pruned after a while
CREATE TABLE events (
    id text PRIMARY KEY,
    seen bigint NOT NULL
);
CREATE INDEX events_by_seen ON events (seen);
