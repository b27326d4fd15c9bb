-- The outbox NOTIFY is skipped while the relay is busy.
--
-- A transaction that notifies takes a database-wide lock in its commit and
-- holds it through the commit's WAL flush, so notifying commits cannot be
-- flushed together: at 1,000 single-event transactions per second they
-- queue behind each other. A busy relay claims again after every batch
-- anyway and needs no wake-up, so it says so in `<schema>.outbox_relay_busy`
-- (a sequence: `setval` is seen at once by every transaction whatever its
-- snapshot, and survives no rollback) and the trigger skips the NOTIFY
-- while it reads 1.
--
-- The handshake that keeps this from losing a wake-up: the trigger first
-- takes the schema's *writers* advisory lock in shared mode (until its
-- transaction ends), then reads the flag. Before it sleeps, the relay sets
-- the flag to 0 and then takes that lock exclusively for an instant
-- (`pg_try_advisory_lock`, so it never makes writers wait behind it): once
-- it has it, every writer that read 1 has committed or rolled back, and
-- its final claim sees their rows; every later writer reads 0 and
-- notifies. While the lock is not free the relay polls, quickly at first.
-- Key: (0x5757 'WW', hashtext(schema) & 2147483647); the relay's own
-- leader lock is (0x5741, same hash).
--
-- `warren_install_outbox_wake(schema)` sets this up on one schema's
-- outbox (a team adopting warren calls it for its own schemas); a schema
-- without it keeps `public.warren_outbox_notify`, which always notifies,
-- and its relay never marks itself busy.
CREATE FUNCTION public.warren_install_outbox_wake(s text) RETURNS void
LANGUAGE plpgsql AS $install$
BEGIN
  EXECUTE format('CREATE SEQUENCE IF NOT EXISTS %I.outbox_relay_busy MINVALUE 0 MAXVALUE 1 START 0', s);
  PERFORM setval(format('%I.outbox_relay_busy', s)::regclass, 0, true);
  EXECUTE format($f$
    CREATE OR REPLACE FUNCTION %1$I.outbox_wake() RETURNS trigger LANGUAGE plpgsql AS $body$
    BEGIN
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
                  FOR EACH STATEMENT EXECUTE FUNCTION %I.outbox_wake()', s, s);
END
$install$;

SELECT public.warren_install_outbox_wake(s)
FROM unnest(ARRAY['customers', 'orders', 'inventory', 'payments', 'shipping', 'bench', 'bench_sink']) AS s;
