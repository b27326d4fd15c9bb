-- Where each stream's progress stood before the batch that last moved it:
-- the inbox admits a batch in one statement (lock, order check, advance),
-- and reads from this column which of the batch's events it admitted.
DO $$
DECLARE s text;
BEGIN
  FOREACH s IN ARRAY ARRAY['customers', 'orders', 'inventory', 'payments', 'shipping', 'bench', 'bench_sink'] LOOP
    EXECUTE format('ALTER TABLE %I.subject_progress ADD COLUMN prev_sequence bigint NOT NULL DEFAULT 0', s);
  END LOOP;
END
$$;
