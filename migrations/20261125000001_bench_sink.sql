-- `warren bench`'s consumer gets a schema of its own, `bench_sink`, and
-- consumes the events of the `bench` outbox as one service consumes
-- another's. Consuming in `bench` itself made every event one of the
-- consumer's own, and a service reading back its own events also moves its
-- sequence counter past them (`Outbox::observe`): a statement per event
-- that no real consumer of another service pays.
CREATE SCHEMA IF NOT EXISTS bench_sink;

CREATE TABLE bench_sink.outbox (
  position     bigserial PRIMARY KEY,
  event_id     uuid NOT NULL UNIQUE,
  aggregate    text NOT NULL,
  sequence     bigint NOT NULL,
  event_type   text NOT NULL,
  version      integer NOT NULL,
  correlation_id text,
  payload      json NOT NULL,
  created_at   timestamptz NOT NULL DEFAULT now(),
  published_at timestamptz,
  UNIQUE (aggregate, sequence)
);
CREATE INDEX outbox_unpublished ON bench_sink.outbox (position) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON bench_sink.outbox (published_at) WHERE published_at IS NOT NULL;
CREATE TRIGGER outbox_notify AFTER INSERT ON bench_sink.outbox
  FOR EACH STATEMENT EXECUTE FUNCTION public.warren_outbox_notify();

CREATE TABLE bench_sink.outbox_sequences (
  aggregate     text PRIMARY KEY,
  last_sequence bigint NOT NULL
);

CREATE TABLE bench_sink.inbox (
  event_id   uuid PRIMARY KEY,
  event_type text NOT NULL,
  source     text NOT NULL,
  subject    text NOT NULL,
  sequence   bigint NOT NULL,
  handled_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX inbox_handled_at ON bench_sink.inbox (handled_at);

CREATE TABLE bench_sink.subject_progress (
  source        text NOT NULL,
  subject       text NOT NULL,
  last_sequence bigint NOT NULL,
  updated_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (source, subject)
);

-- What the consumer writes: one row per handled event.
CREATE TABLE bench_sink.items (
  event_id   uuid PRIMARY KEY,
  subject    text NOT NULL,
  handled_at timestamptz NOT NULL DEFAULT now()
);
