-- balsync's PostgreSQL role, with only what balsync needs to run.
--
-- 1. An administrator (the owner of the database, or a superuser) creates the schema once:
--        BALSYNC_DATABASE_URL=postgresql://admin@db/app balsync init-db
--    and again after each upgrade of balsync (init-db is idempotent and may add tables).
-- 2. The same administrator runs this file, in the same database, then sets the password
--    interactively, so that it appears in no file, no argv and no shell history:
--        psql 'postgresql://admin@db/app' -f deploy/postgres-role.sql
--        psql 'postgresql://admin@db/app' -c '\password balsync'
--    Variables, all optional (psql -v NAME=VALUE):
--        role           the login role to create or restrict      [balsync]
--        target_schema  schema of the target table (--table)      [public]
--        target_table   the target table                          [user_balances]
--    e.g. psql … -v role=balsync_ledger -v target_schema=ledger -v target_table=balances -f …
-- 3. balsync then runs as that role: BALSYNC_DATABASE_URL=postgresql://balsync@db/app
--    (the password from BALSYNC_DATABASE_URL_FILE, a Kubernetes Secret, or ~/.pgpass).
--
-- What the role gets, and why (balance_sync/stores/postgres/ holds every statement):
--   CONNECT, TEMPORARY on the database   each batch is COPYed into a temporary staging table
--   USAGE on schema balsync              run records, batch ledger, skipped records, conflicts
--   SELECT, INSERT, UPDATE on balsync.*  a run inserts its record and updates it as it ends
--   DELETE on balsync.run_batches and    a finished run drops its batch ledger
--     balsync.restart_seen               and the evidence it gathered after a Redis restart
--   DELETE on balsync.sync_runs, balsync.skipped_records, balsync.conflicts
--                                        retention prunes old run records and what hangs
--                                        off them; never balsync.written (the memory of
--                                        written values), balsync.redis_trust, nor any
--                                        table a later init-db adds
--   USAGE on balsync's sequences         the bigserial ids of runs, skipped records, conflicts
--   USAGE on the target schema
--   SELECT, INSERT, UPDATE on the table  merge: UPDATE … FROM, INSERT … ON CONFLICT
-- and nothing else: no DELETE on the balances (a sync never deletes a row) nor on
-- balsync.written, no TRUNCATE anywhere, no REFERENCES or TRIGGER, no CREATE anywhere, so it
-- cannot run `balsync init-db` itself; not a superuser, no CREATEDB, CREATEROLE, REPLICATION
-- or BYPASSRLS. Advisory locks, pg_locks and the catalogs need no grant.
--
-- For an application table that balsync must only update (`--table users --id-column id`),
-- grant by column instead of the table-wide line at the end:
--     GRANT SELECT (id, balance, updated_at), UPDATE (balance, updated_at) ON users TO balsync;
-- (add INSERT only if new ids may be inserted; drop updated_at where the table has none).
--
-- Running this file again is safe: the role is created only when absent, then its
-- attributes are set and the grants given again.

\set ON_ERROR_STOP on

\if :{?role}
\else
  \set role balsync
\endif
\if :{?target_schema}
\else
  \set target_schema public
\endif
\if :{?target_table}
\else
  \set target_table user_balances
\endif

BEGIN;

SELECT NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') AS balsync_role_is_new \gset
\if :balsync_role_is_new
  CREATE ROLE :"role" LOGIN;
\endif
ALTER ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO :"role";

GRANT USAGE ON SCHEMA balsync TO :"role";
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA balsync TO :"role";
GRANT DELETE ON balsync.run_batches, balsync.restart_seen, balsync.sync_runs,
    balsync.skipped_records, balsync.conflicts TO :"role";
GRANT USAGE ON ALL SEQUENCES IN SCHEMA balsync TO :"role";
-- Bookkeeping tables a later `balsync init-db` adds (run by the same administrator).
ALTER DEFAULT PRIVILEGES IN SCHEMA balsync GRANT SELECT, INSERT, UPDATE ON TABLES TO :"role";
ALTER DEFAULT PRIVILEGES IN SCHEMA balsync GRANT USAGE ON SEQUENCES TO :"role";

GRANT USAGE ON SCHEMA :"target_schema" TO :"role";
GRANT SELECT, INSERT, UPDATE ON TABLE :"target_schema".:"target_table" TO :"role";

COMMIT;
