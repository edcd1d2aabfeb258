-- Jobs (EVENTS.md "Jobs"): the read model of the job-<uuid> streams, rebuilt by replay.
CREATE TABLE jobs (
    job_uuid          uuid        PRIMARY KEY,
    kind              text        NOT NULL,
    id_session        bigint      NOT NULL,
    -- queued | running | retry_scheduled | succeeded | failed | cancelled
    status            text        NOT NULL,
    attempts          integer     NOT NULL,
    max_attempts      integer     NOT NULL,
    progress_done     bigint      NOT NULL,
    progress_total    bigint,
    result            jsonb,
    error             text,
    requested_by_kind text        NOT NULL,
    requested_by_uuid uuid        NOT NULL,
    source_url        text,
    -- While running: until when the worker's lease holds.
    lease_until       timestamptz,
    -- While waiting for a retry: not before then.
    next_attempt_at   timestamptz,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    version           bigint      NOT NULL,
    created_position  bigint      NOT NULL
);
CREATE INDEX jobs_by_session ON jobs (id_session, created_position DESC);
CREATE INDEX jobs_running_leases ON jobs (lease_until) WHERE status = 'running';

-- What a job needs but the event log must not carry (it is published to every
-- consumer and kept forever): an import's full source URL, with its credentials.
-- Written in the job's first transaction; not a read model (replay leaves it alone).
CREATE TABLE job_inputs (
    job_uuid uuid PRIMARY KEY,
    url      text NOT NULL
);

-- Idempotency-Key of POST /imports: one key per principal names one request.
CREATE TABLE idempotency_keys (
    principal_kind text        NOT NULL,
    principal_uuid uuid        NOT NULL,
    key            text        NOT NULL,
    body_sha256    text        NOT NULL,
    job_uuid       uuid        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal_kind, principal_uuid, key)
);
