-- Eager publishing: a producer may publish its own events right after its
-- commit (see producers/src/eager.rs) instead of waiting for the relay to
-- read them back. Such rows are appended *leased*: `leased_until` says
-- until when the eager publisher owns them. The relay leaves a leased row
-- alone until its lease has run out, so a row is not published twice in
-- the usual case, and takes it like any other row afterwards, so a
-- producer that died between its commit and its publish loses nothing.
--
-- A leased row needs no wake-up: the trigger skips the NOTIFY (and with
-- it the database-wide lock a notifying commit takes) when every row the
-- statement inserted is leased. The relay finds rows whose lease ran out
-- on its periodic poll.
DO $$
DECLARE t record;
BEGIN
  -- Every outbox of warren's layout, the services' and any a team added.
  FOR t IN
    SELECT c.table_schema FROM information_schema.columns c
    WHERE c.table_name = 'outbox' AND c.column_name = 'published_at'
  LOOP
    EXECUTE format('ALTER TABLE %I.outbox ADD COLUMN IF NOT EXISTS leased_until timestamptz', t.table_schema);
  END LOOP;
END
$$;

-- As in 20261201000001 (see there for the handshake), plus the lease: the
-- trigger sees the statement's rows as a transition table and returns at
-- once when none of them is unleased.
CREATE OR REPLACE FUNCTION public.warren_install_outbox_wake(s text) RETURNS void
LANGUAGE plpgsql AS $install$
BEGIN
  EXECUTE format('ALTER TABLE %I.outbox ADD COLUMN IF NOT EXISTS leased_until timestamptz', s);
  EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I.outbox_relay_busy MINVALUE 0 MAXVALUE 1 START 0', s);
  PERFORM setval(format('%I.outbox_relay_busy', s)::regclass, 0, true);
  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $body$
    BEGIN
      IF NOT EXISTS (SELECT 1 FROM added WHERE leased_until IS NULL) THEN
        RETURN NULL;
      END IF;
      PERFORM pg_advisory_xact_lock_shared(22359, hashtext(TG_TABLE_SCHEMA) & 2147483647);
      IF pg_sequence_last_value(%2$L::regclass) IS DISTINCT FROM 1 THEN
        PERFORM pg_notify(%3$L, '');
      END IF;
      RETURN NULL;
    END
    $body$$f$,
    s, format('%I.outbox_relay_busy', s), 'warren_outbox_' || s);
  EXECUTE format('DROP TRIGGER IF EXISTS outbox_notify ON %I.outbox', s);
  EXECUTE format('CREATE TRIGGER outbox_notify AFTER INSERT ON %I.outbox
                  REFERENCING NEW TABLE AS added
                  FOR EACH STATEMENT EXECUTE FUNCTION %I.outbox_wake()', s, s);
END
$install$;

SELECT public.warren_install_outbox_wake(s)
FROM unnest(ARRAY['customers', 'orders', 'inventory', 'payments', 'shipping', 'bench', 'bench_sink']) AS s;
