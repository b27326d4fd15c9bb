-- The shop's domain tables: one schema per service, each owning its own.
--
-- warren's messaging tables (outbox, outbox_sequences, inbox,
-- subject_progress, the outbox trigger) are not here: the library installs
-- them (`producers::install`, `consumers::install`), and
-- `services::migrate` runs that after these migrations.
--
-- This baseline replaces the migrations of 2026-11-24 to 2026-12-02. A
-- database migrated by those already has every table below, so each
-- statement is written to change nothing there (IF NOT EXISTS).

CREATE SCHEMA IF NOT EXISTS customers;
CREATE SCHEMA IF NOT EXISTS orders;
CREATE SCHEMA IF NOT EXISTS inventory;
CREATE SCHEMA IF NOT EXISTS payments;
CREATE SCHEMA IF NOT EXISTS shipping;

CREATE TABLE IF NOT EXISTS customers.customers (
  id         uuid PRIMARY KEY,
  name       text NOT NULL,
  email      text NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

-- Read model of customers, fed only by customer.* events.
CREATE TABLE IF NOT EXISTS orders.customers (
  id         uuid PRIMARY KEY,
  name       text NOT NULL,
  email      text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders.orders (
  id            uuid PRIMARY KEY,
  customer_id   uuid NOT NULL,
  status        text NOT NULL CHECK (status IN ('pending', 'confirmed', 'cancelled', 'shipped')),
  total         bigint NOT NULL CHECK (total >= 0),
  payment_token text NOT NULL,
  reason        text,
  created_at    timestamptz NOT NULL DEFAULT now(),
  updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders.order_lines (
  order_id   uuid NOT NULL REFERENCES orders.orders (id),
  line_no    integer NOT NULL,
  sku        text NOT NULL,
  qty        integer NOT NULL CHECK (qty > 0),
  unit_price bigint NOT NULL CHECK (unit_price >= 0),
  PRIMARY KEY (order_id, line_no)
);

CREATE TABLE IF NOT EXISTS inventory.stock (
  sku      text PRIMARY KEY,
  on_hand  integer NOT NULL CHECK (on_hand >= 0),
  reserved integer NOT NULL DEFAULT 0 CHECK (reserved >= 0),
  version  bigint NOT NULL DEFAULT 0
);

-- One row per order that got stock; status held → released | shipped.
CREATE TABLE IF NOT EXISTS inventory.reservations (
  order_id   uuid PRIMARY KEY,
  lines      jsonb NOT NULL,
  status     text NOT NULL CHECK (status IN ('held', 'released', 'shipped')),
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS payments.payments (
  order_id   uuid PRIMARY KEY,
  payment_id uuid NOT NULL UNIQUE,
  status     text NOT NULL CHECK (status IN ('captured', 'failed', 'refunded')),
  amount     bigint NOT NULL,
  reason     text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS payments.refunds (
  payment_id uuid PRIMARY KEY REFERENCES payments.payments (payment_id),
  order_id   uuid NOT NULL,
  amount     bigint NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- The simulated payment gateway's own ledger. It stands for the gateway's
-- side of the world: written outside the payments handler's transaction
-- (as a remote call would be), keyed by the idempotency key, so a retried
-- charge after a crash returns the first result instead of charging again.
CREATE TABLE IF NOT EXISTS payments.gateway_ledger (
  idempotency_key text PRIMARY KEY,
  kind            text NOT NULL CHECK (kind IN ('charge', 'refund')),
  order_id        uuid NOT NULL,
  amount          bigint NOT NULL,
  outcome         text NOT NULL CHECK (outcome IN ('captured', 'declined', 'refunded')),
  payment_id      uuid NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shipping.shipments (
  id         uuid PRIMARY KEY,
  order_id   uuid NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now()
);
