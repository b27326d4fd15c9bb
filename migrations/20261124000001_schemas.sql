-- One schema per service (and `bench`, the store of `warren bench`). Each owns its domain tables and the same four
-- messaging tables:
--   outbox            events raised in the service's transactions, until the
--                     relay has them confirmed by the broker (then pruned)
--   outbox_sequences  the last `sequence` given per subject; its row lock
--                     serialises concurrent appends on one subject
--   inbox             ids of events already handled: the idempotency record
--   subject_progress  last `sequence` applied per (source, subject), so
--                     events of one aggregate apply in order

DO $$
DECLARE s text;
BEGIN
  FOREACH s IN ARRAY ARRAY['customers', 'orders', 'inventory', 'payments', 'shipping', 'bench'] LOOP
    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', s);
    EXECUTE format($f$
      CREATE TABLE %1$I.outbox (
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
      )$f$, s);
    EXECUTE format('CREATE INDEX outbox_unpublished ON %I.outbox (position) WHERE published_at IS NULL', s);
    EXECUTE format('CREATE INDEX outbox_published_at ON %I.outbox (published_at) WHERE published_at IS NOT NULL', s);
    EXECUTE format($f$
      CREATE TABLE %1$I.outbox_sequences (
        aggregate     text PRIMARY KEY,
        last_sequence bigint NOT NULL
      )$f$, s);
    EXECUTE format($f$
      CREATE TABLE %1$I.inbox (
        event_id   uuid PRIMARY KEY,
        event_type text NOT NULL,
        source     text NOT NULL,
        subject    text NOT NULL,
        sequence   bigint NOT NULL,
        handled_at timestamptz NOT NULL DEFAULT now()
      )$f$, s);
    EXECUTE format('CREATE INDEX inbox_handled_at ON %I.inbox (handled_at)', s);
    EXECUTE format($f$
      CREATE TABLE %1$I.subject_progress (
        source        text NOT NULL,
        subject       text NOT NULL,
        last_sequence bigint NOT NULL,
        updated_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (source, subject)
      )$f$, s);
  END LOOP;
END
$$;

CREATE TABLE customers.customers (
  id         uuid PRIMARY KEY,
  name       text NOT NULL,
  email      text NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- Read model of customers, fed only by customer.* events.
CREATE TABLE orders.customers (
  id         uuid PRIMARY KEY,
  name       text NOT NULL,
  email      text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders.orders (
  id            uuid PRIMARY KEY,
  customer_id   uuid NOT NULL,
  status        text NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled', 'shipped')),
  total         bigint NOT NULL CHECK (total >= 0),
  payment_token text NOT NULL,
  reason        text,
  created_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders.order_lines (
  order_id   uuid NOT NULL REFERENCES orders.orders (id),
  line_no    integer NOT NULL,
  sku        text NOT NULL,
  qty        integer NOT NULL CHECK (qty > 0),
  unit_price bigint NOT NULL CHECK (unit_price >= 0),
  PRIMARY KEY (order_id, line_no)
);

CREATE TABLE inventory.stock (
  sku      text PRIMARY KEY,
  on_hand  integer NOT NULL CHECK (on_hand >= 0),
  reserved integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
  version  bigint NOT NULL DEFAULT 0
);

-- One row per order that got stock; status held → released | shipped.
CREATE TABLE inventory.reservations (
  order_id   uuid PRIMARY KEY,
  lines      jsonb NOT NULL,
  status     text NOT NULL CHECK (status IN ('held', 'released', 'shipped')),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payments.payments (
  order_id   uuid PRIMARY KEY,
  payment_id uuid NOT NULL UNIQUE,
  status     text NOT NULL CHECK (status IN ('captured', 'failed', 'refunded')),
  amount     bigint NOT NULL,
  reason     text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE payments.refunds (
  payment_id uuid PRIMARY KEY REFERENCES payments.payments (payment_id),
  order_id   uuid NOT NULL,
  amount     bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shipping.shipments (
  id         uuid PRIMARY KEY,
  order_id   uuid NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- Wake the relay of a schema when its outbox gets rows. A statement-level
-- trigger costs no extra round trip per append, and PostgreSQL folds equal
-- notifications of one transaction into one, delivered at commit.
CREATE FUNCTION public.warren_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('warren_outbox_' || TG_TABLE_SCHEMA, '');
  RETURN NULL;
END
$$;

DO $$
DECLARE s text;
BEGIN
  FOREACH s IN ARRAY ARRAY['customers', 'orders', 'inventory', 'payments', 'shipping', 'bench'] LOOP
    EXECUTE format('CREATE TRIGGER outbox_notify AFTER INSERT ON %I.outbox
                    FOR EACH STATEMENT EXECUTE FUNCTION public.warren_outbox_notify()', s);
  END LOOP;
END
$$;

-- The simulated payment gateway's own ledger. It stands for the gateway's
-- side of the world: written outside the payments handler's transaction
-- (as a remote call would be), keyed by the idempotency key, so a retried
-- charge after a crash returns the first result instead of charging again.
CREATE TABLE payments.gateway_ledger (
  idempotency_key text PRIMARY KEY,
  kind            text NOT NULL CHECK (kind IN ('charge', 'refund')),
  order_id        uuid NOT NULL,
  amount          bigint NOT NULL,
  outcome         text NOT NULL CHECK (outcome IN ('captured', 'declined', 'refunded')),
  payment_id      uuid NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now()
);

-- What `warren bench`'s consumer writes: one row per handled event.
CREATE TABLE bench.items (
  event_id   uuid PRIMARY KEY,
  subject    text NOT NULL,
  handled_at timestamptz NOT NULL DEFAULT now()
);
