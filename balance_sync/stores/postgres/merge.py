"""The merge: one batch of balances from Redis into the target table, in one transaction,
with balsync's memory of what it wrote."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Literal, LiteralString

from psycopg import sql

from balance_sync.errors import LockLost
from balance_sync.settings import TableName
from balance_sync.stores.postgres.connection import Connection, Part, _ident
from balance_sync.stores.postgres.lock import _LOCK_ROW, LOCK_CLASS, RunLock
from balance_sync.stores.postgres.memory_layout import WRITING, target_id
from balance_sync.stores.postgres.schema import TargetTable
from balance_sync.stores.postgres.trust import Trust
from balance_sync.validation import InvalidRecord, ValidRecord

RAW_VALUE_LIMIT = 200
UNKNOWN_ID = "unknown id: no such row, and the table takes no inserts"
# How a row of balsync.written is replaced: its last written value, whoever wrote it first.
_REMEMBER: LiteralString = (
    "ON CONFLICT (target_id, telegram_id) DO UPDATE SET balance = EXCLUDED.balance, cleared = false"
)


def text_of(data: bytes) -> str:
    """Bytes from Redis as text that PostgreSQL accepts (no NUL, invalid UTF-8 escaped)."""
    return data.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


ConflictKind = Literal["changed_in_db", "redis_restarted"]
OnConflict = Literal["skip", "redis", "db"]
Resolution = Literal["kept", "redis", "db"]


@dataclass(frozen=True)
class Conflict:
    """A row balsync did not simply overwrite, and why."""

    telegram_id: int
    db_value: Decimal
    redis_value: Decimal
    last_written: Decimal | None
    kind: ConflictKind
    resolution: Resolution


@dataclass(frozen=True)
class MergePolicy:
    """How a batch treats rows that differ from what balsync last wrote."""

    on_conflict: OnConflict = "skip"
    hold_updates: bool = False  # Redis restarted: insert new ids, overwrite nothing
    # The ids whose conflicts --on-conflict resolves (--ids); None: every id.
    resolve_ids: frozenset[int] | None = None
    # The table was empty when the run began (a first sync) and takes inserts: a batch
    # inserts its rows straight from staging; only ids that turn out to exist are classified.
    insert_first: bool = False

    def resolution(self, telegram_id: int, kind: ConflictKind) -> Resolution:
        """What happens to a conflicting row: kept, or resolved for Redis or the database.

        A row held after a Redis restart is resolved only in PostgreSQL's favour here:
        letting Redis win is trusting the new server, which --accept-redis-restart decides.
        """
        chosen = self.resolve_ids is None or telegram_id in self.resolve_ids
        if not chosen or self.on_conflict == "skip":
            return "kept"
        if kind == "redis_restarted" and self.on_conflict != "db":
            return "kept"
        return self.on_conflict


@dataclass(frozen=True)
class Staged:
    """A batch's valid records as the text COPY takes: what stays resident while the batch
    waits for a writer (an eighth of the records as Python objects)."""

    text: bytes = b""
    count: int = 0

    @classmethod
    def of(cls, records: Sequence[ValidRecord]) -> Staged:
        """The records (id, value) as COPY lines."""
        if not records:
            return cls()
        return cls(b"".join([b"\n".join(map(b"\t".join, records)), b"\n"]), len(records))


@dataclass(frozen=True)
class BatchCounts:
    """What PostgreSQL reported for one batch."""

    inserted: int
    updated: int
    unknown_ids: list[int]
    conflicts: list[Conflict] = field(default_factory=list)

    @property
    def kept(self) -> int:
        """Rows left as they were because of a conflict: skipped records of the run."""
        return sum(1 for c in self.conflicts if c.resolution == "kept")


class Merge(Part):
    """Writes batches of balances into the target table."""

    def apply_batch(
        self,
        target: TargetTable,
        staged: Staged,
        invalid: Sequence[InvalidRecord],
        *,
        run_id: int | None,
        batch_no: int,
        lock: RunLock | None,
        policy: MergePolicy = MergePolicy(),
        key_prefix: str = "",
        reserve: Callable[[str, int], int] = lambda kind, wanted: 0,
        before_commit: Callable[[], Trust | None] | None = None,
        resolve_in_redis: Callable[[list[Conflict]], set[int]] | None = None,
    ) -> BatchCounts:
        """Write one batch in one transaction: COPY into staging, then a set-based merge.

        Existing ids are updated only where the balance differs and nobody else changed the
        row since balsync last wrote it (else: a conflict, handled by `policy`); new ids are
        inserted when the table allows it and reported as unknown otherwise. With `run_id`
        None (a dry run) the transaction only counts and is rolled back. Skipped records
        (invalid first, then unknown ids) and conflicts are stored in the same transaction,
        as many as `reserve("skipped"|"conflicts", wanted)` grants: a run's caps are shared by
        parallel writers. `before_commit` runs last inside the transaction: raising there
        (Redis changed under the run) commits nothing of the batch; the position it returns
        (how far the trusted server's history had come) is recorded with the batch.
        `resolve_in_redis` gives Redis the database's value for the conflicts resolved for
        it and says which keys it really set: only those are remembered; the others stay
        conflicts, kept.
        """

        def run(conn: Connection) -> BatchCounts:
            with conn.transaction(force_rollback=run_id is None):
                if lock is not None:
                    _check_lock(conn, target.table, lock.holder_pid())
                _stage(conn, staged.text)
                if run_id is not None:
                    done = _batch_done(conn, target, run_id, batch_no)
                    if done is not None:
                        return done
                if policy.insert_first:
                    counts = _insert_first(conn, target, policy, staged.count)
                else:
                    counts = _merge(conn, target, policy, dry_run=run_id is None)
                if run_id is None:
                    return counts
                if resolve_in_redis is not None:
                    counts = _resolved_for_db(conn, target, counts, resolve_in_redis)
                conn.execute(
                    """INSERT INTO balsync.run_batches
                           (run_id, batch_no, inserted, updated, unknown, conflicts)
                       VALUES (%s, %s, %s, %s, %s, %s)""",
                    (
                        run_id,
                        batch_no,
                        counts.inserted,
                        counts.updated,
                        len(counts.unknown_ids),
                        len(counts.conflicts),
                    ),
                )
                # Reserved only now that every count is known; a retried attempt reserves
                # again, so a retry can only lower what is kept, never exceed the cap.
                keep = reserve("skipped", len(invalid) + len(counts.unknown_ids))
                prefix = key_prefix.encode()
                skipped = list(invalid[:keep]) + [
                    InvalidRecord(prefix + b"%d" % telegram_id, None, UNKNOWN_ID)
                    for telegram_id in counts.unknown_ids[: max(0, keep - len(invalid))]
                ]
                if skipped:
                    _store_skipped(conn, run_id, skipped)
                if counts.conflicts:
                    room = reserve("conflicts", len(counts.conflicts))
                    _store_conflicts(conn, run_id, counts.conflicts[:room])
                if policy.hold_updates:
                    # Found in Redis with a valid value; a held row is counted as held too.
                    conn.execute(
                        """INSERT INTO balsync.restart_seen (run_id, telegram_id)
                           SELECT %s, s.id FROM pg_temp.balsync_stage s
                           ON CONFLICT DO NOTHING""",
                        (run_id,),
                    )
                if before_commit is not None:
                    _read_up_to(conn, target.table, before_commit())
                return counts

        return self.call(run)


def _check_lock(conn: Connection, table: TableName, holder_pid: int) -> None:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND granted AND " + _LOCK_ROW + ")",
        (holder_pid, LOCK_CLASS, _ident(table).as_string(conn)),
    ).fetchone()
    if not (row and row[0]):
        raise LockLost(
            f"this run lost the advisory lock on {table}",
            "another run may be writing; the next run converges",
        )


def _stage(conn: Connection, payload: bytes) -> None:
    # Temporary tables of this connection; ON COMMIT DELETE ROWS empties them per batch.
    # A batch is a few thousand ids: index lookups into the target and balsync.written cost
    # milliseconds, while a hash join reads the whole table, every batch (measured: 290 ms
    # against 27 ms per 10 000 ids at a million rows). Scans are ruled out too, not left to
    # statistics: a table analyzed while empty (a first sync) gets plans that scan it whole
    # for every row while it grows, and a prepared statement keeps such a plan.
    # Forcing plans inflates their cost past the JIT threshold, and compiling would cost
    # more than the few milliseconds the statements run.
    conn.execute(
        """SELECT set_config('enable_hashjoin', 'off', true),
                  set_config('enable_mergejoin', 'off', true),
                  set_config('enable_seqscan', 'off', true),
                  set_config('enable_bitmapscan', 'off', true),
                  set_config('jit', 'off', true),
                  set_config('balsync.writing', 'on', true)"""
    )
    conn.execute(
        """CREATE TEMP TABLE IF NOT EXISTS balsync_stage (
               id bigint NOT NULL, balance numeric(20,2) NOT NULL
           ) ON COMMIT DELETE ROWS"""
    )
    # `tid` and `wtid` locate the rows of the target and of balsync.written that the delta
    # was read from, so writing them back costs no second index lookup.
    conn.execute(
        """CREATE TEMP TABLE IF NOT EXISTS balsync_delta (
               id bigint NOT NULL, new numeric(20,2) NOT NULL, old numeric,
               present boolean NOT NULL, tid tid, written numeric(20,2), wtid tid
           ) ON COMMIT DELETE ROWS"""
    )
    with conn.cursor().copy("COPY pg_temp.balsync_stage (id, balance) FROM STDIN") as copy:
        copy.write(payload)


def _batch_done(
    conn: Connection, target: TargetTable, run_id: int, batch_no: int
) -> BatchCounts | None:
    """The counts of this batch if an earlier attempt committed it (its answer was lost)."""
    done = conn.execute(
        """SELECT inserted, updated, unknown FROM balsync.run_batches
           WHERE run_id = %s AND batch_no = %s""",
        (run_id, batch_no),
    ).fetchone()
    if done is None:
        return None
    conflicts = [
        Conflict(int(r[0]), r[1], r[2], r[3], r[4], r[5])
        for r in conn.execute(
            """SELECT c.telegram_id, c.db_value, c.redis_value, c.last_written, c.kind,
                      c.resolution
               FROM balsync.conflicts c JOIN pg_temp.balsync_stage s ON s.id = c.telegram_id
               WHERE c.run_id = %s""",
            (run_id,),
        )
    ]
    unknown = _unknown_ids(conn, target) if done[2] else []
    return BatchCounts(int(done[0]), int(done[1]), unknown, conflicts)


def _insert_first(
    conn: Connection, target: TargetTable, policy: MergePolicy, staged: int
) -> BatchCounts:
    """Insert the staged batch into a table that was empty when the run began, with memory.

    Skipping the classification saves about a sixth of a first sync. An id that exists now
    (the application inserted it meanwhile, or SCAN returned it twice) is left alone here
    and classified as usual afterwards.
    """
    columns, values = _touch_on_insert(target)
    if target.memory_in_row:
        inserted = conn.execute(
            sql.SQL(
                """INSERT INTO {table} ({id}, {bal}, balsync_written{columns})
                   SELECT s.id, s.balance, s.balance{values} FROM pg_temp.balsync_stage s
                   ON CONFLICT ({id}) DO NOTHING"""
            ).format(columns=columns, values=values, **_names(target))
        ).rowcount
    else:
        inserted = _insert_first_remembered_aside(conn, target, columns, values)
    if inserted == staged:
        return BatchCounts(inserted, 0, [])
    rest = _merge(conn, target, policy, dry_run=False)
    return BatchCounts(inserted + rest.inserted, rest.updated, rest.unknown_ids, rest.conflicts)


def _insert_first_remembered_aside(
    conn: Connection, target: TargetTable, columns: sql.Composable, values: sql.Composable
) -> int:
    return conn.execute(
        sql.SQL(
            """WITH ins AS (
                   INSERT INTO {table} ({id}, {bal}{columns})
                   SELECT s.id, s.balance{values} FROM pg_temp.balsync_stage s
                   ON CONFLICT ({id}) DO NOTHING
                   RETURNING {id} AS id, {bal} AS balance
               )
               INSERT INTO balsync.written (target_id, telegram_id, balance)
               SELECT %s, id, balance FROM ins """
            + _REMEMBER
        ).format(columns=columns, values=values, **_names(target)),
        (_memory_id(conn, target),),
    ).rowcount


def _memory_id(conn: Connection, target: TargetTable) -> int:
    """The id balsync.written knows the target by (by its oid, where memory is in its rows)."""
    relation = target.ident.as_string(conn) if target.memory_in_row else None
    return target_id(conn, str(target.table), relation)


def _names(target: TargetTable) -> dict[str, sql.Composable]:
    """The target table and its id and balance columns, as the merge statements name them."""
    return {
        "table": target.ident,
        "id": sql.Identifier(target.id_column),
        "bal": sql.Identifier(target.balance_column),
    }


def _touch_on_insert(target: TargetTable) -> tuple[sql.Composable, sql.Composable]:
    """The column list and values an INSERT adds for `updated_at`, if the table has one."""
    if target.has_updated_at:
        return sql.SQL(", updated_at"), sql.SQL(", now()")
    return sql.SQL(""), sql.SQL("")


def _merge(
    conn: Connection, target: TargetTable, policy: MergePolicy, *, dry_run: bool
) -> BatchCounts:
    """Classify the staged batch against the table and balsync's memory, then write.

    One pass over the batch finds the few rows that need anything (the delta): new ids,
    changed balances, and rows that agree with Redis but whose memory is missing or stale
    (an adopted table, a value someone else wrote), with what balsync last wrote for
    them. Everything after that touches only the delta.
    """
    key = _memory_id(conn, target)
    delta = (_classify_in_row if target.memory_in_row else _classify)(conn, target, key)
    if delta == 0:
        return BatchCounts(0, 0, [])
    conflicts = _conflicts(conn, policy)
    set_aside = [c.telegram_id for c in conflicts if c.resolution != "redis"]
    if set_aside:
        conn.execute("DELETE FROM pg_temp.balsync_delta WHERE id = ANY(%s)", (set_aside,))
    unknown: list[int] = []
    if not target.can_insert:
        unknown = [
            int(r[0])
            for r in conn.execute("SELECT id FROM pg_temp.balsync_delta WHERE NOT present")
        ]
        conn.execute("DELETE FROM pg_temp.balsync_delta WHERE NOT present")
    if dry_run:
        row = conn.execute(
            """SELECT count(*) FILTER (WHERE NOT present),
                      count(*) FILTER (WHERE present AND old IS DISTINCT FROM new)
               FROM pg_temp.balsync_delta"""
        ).fetchone()
        assert row is not None
        return BatchCounts(int(row[0]), int(row[1]), unknown, conflicts)
    if target.memory_in_row:
        updated, inserted = _write_in_row(conn, target)
    else:
        updated, inserted = _write(conn, target, key)
    # A conflict resolved for the database is remembered only once Redis holds its value
    # (`Database.remember`, after the compare-and-set): never on the hope that it will.
    return BatchCounts(inserted, updated, unknown, conflicts)


def _classify(conn: Connection, target: TargetTable, key: int) -> int:
    """Fill the delta, with the memory balsync.written holds; returns its size."""
    names = _names(target)
    # Each lookup is a LATERAL subquery behind OFFSET 0, so it runs once per row and by
    # index whatever the statistics say: tables that were empty when last analyzed (a first
    # sync) otherwise get plans that scan them whole for every row, while they grow.
    return conn.execute(
        sql.SQL(
            """INSERT INTO pg_temp.balsync_delta
               SELECT d.id, d.new, d.old, d.present, d.tid, w.balance, w.ctid
               FROM (SELECT s.id, s.balance AS new, t.balance AS old, t.tid,
                            t.id IS NOT NULL AS present
                     FROM pg_temp.balsync_stage s LEFT JOIN LATERAL (
                         SELECT x.{id} AS id, x.{bal} AS balance, {tid} AS tid FROM {table} x
                         WHERE x.{id} = s.id OFFSET 0) t ON true
                     OFFSET 0) AS d
               LEFT JOIN LATERAL (
                   SELECT m.balance, m.ctid FROM balsync.written m
                   WHERE m.target_id = %s AND m.telegram_id = d.id OFFSET 0) w ON true
               WHERE d.old IS DISTINCT FROM d.new OR w.balance IS DISTINCT FROM d.new"""
        ).format(tid=sql.SQL("x.ctid" if target.has_ctid else "NULL::tid"), **names),
        (key,),
    ).rowcount


def _classify_in_row(conn: Connection, target: TargetTable, key: int) -> int:
    """Fill the delta, with the memory in the target's own rows; returns its size.

    balsync.written is looked up only for an id whose row has no memory: a row deleted or
    truncated (its memory left there by the table's triggers) and inserted again, or a
    new id. A row with memory costs no second lookup.
    """
    return conn.execute(
        sql.SQL(
            """INSERT INTO pg_temp.balsync_delta
               SELECT d.id, d.new, d.old, d.present, d.tid, coalesce(d.mem, w.balance), NULL
               FROM (SELECT s.id, s.balance AS new, t.balance AS old, t.tid, t.mem,
                            t.id IS NOT NULL AS present
                     FROM pg_temp.balsync_stage s LEFT JOIN LATERAL (
                         SELECT x.{id} AS id, x.{bal} AS balance, x.ctid AS tid,
                                x.balsync_written AS mem
                         FROM {table} x WHERE x.{id} = s.id OFFSET 0) t ON true
                     OFFSET 0) AS d
               LEFT JOIN LATERAL (
                   SELECT m.balance FROM balsync.written m
                   WHERE d.mem IS NULL AND m.target_id = %s AND m.telegram_id = d.id
                   OFFSET 0) w ON true
               WHERE d.old IS DISTINCT FROM d.new
                  OR coalesce(d.mem, w.balance) IS DISTINCT FROM d.new"""
        ).format(**_names(target)),
        (key,),
    ).rowcount


def _write_in_row(conn: Connection, target: TargetTable) -> tuple[int, int]:
    """Write the delta and its memory into the same rows: (updated, inserted).

    One UPDATE per row sets the balance and what balsync wrote; a row that already agrees
    gets its memory only (updated_at kept). The balance is checked again under the row
    lock, as in `_write`.
    """
    names = _names(target)
    touch = (
        sql.SQL(
            ", updated_at = CASE WHEN d.old IS DISTINCT FROM d.new THEN now() ELSE t.updated_at END"
        )
        if target.has_updated_at
        else sql.SQL("")
    )
    columns, values = _touch_on_insert(target)
    inserting = (
        sql.SQL(
            """, ins AS (
                   INSERT INTO {table} ({id}, {bal}, balsync_written{cols})
                   SELECT d.id, d.new, d.new{vals} FROM pg_temp.balsync_delta d
                   WHERE NOT d.present
                   ON CONFLICT ({id}) DO NOTHING
                   RETURNING 1
               )"""
        ).format(cols=columns, vals=values, **names)
        if target.can_insert
        else sql.SQL("")
    )
    row = conn.execute(
        sql.SQL(
            """WITH upd AS (
                   UPDATE {table} AS t
                   SET {bal} = d.new, balsync_written = d.new, balsync_cleared = false{touch}
                   FROM pg_temp.balsync_delta d
                   WHERE t.ctid = d.tid AND (t.{id} = d.id) IS TRUE AND d.present
                     AND t.{bal} IS NOT DISTINCT FROM d.old
                   RETURNING d.old IS DISTINCT FROM d.new AS changed
               ){inserting}
               SELECT (SELECT count(*) FROM upd WHERE changed), {inserted}"""
        ).format(
            touch=touch,
            inserting=inserting,
            inserted=sql.SQL("(SELECT count(*) FROM ins)" if target.can_insert else "0"),
            **names,
        )
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _write(conn: Connection, target: TargetTable, key: int) -> tuple[int, int]:
    """Write the delta, and its memory into balsync.written: (updated, inserted)."""
    names = _names(target)
    touch = sql.SQL(", updated_at = now()") if target.has_updated_at else sql.SQL("")
    insert_touch = _touch_on_insert(target)
    # `t.bal IS NOT DISTINCT FROM d.old` is checked again under the row lock: a row someone
    # changes between our look and our write is left alone and found as a conflict by the
    # next run. An id the application inserts meanwhile is left alone too (DO NOTHING).
    inserting = (
        sql.SQL(
            """, ins AS (
                   INSERT INTO {table} ({id}, {bal}{cols})
                   SELECT d.id, d.new{vals} FROM pg_temp.balsync_delta d WHERE NOT d.present
                   ON CONFLICT ({id}) DO NOTHING
                   RETURNING {id} AS id, {bal} AS balance
               )"""
        ).format(cols=insert_touch[0], vals=insert_touch[1], **names)
        if target.can_insert
        else sql.SQL("")
    )
    # Rows are found again by their ctid, not a second index lookup (10-15 % of the merge
    # when every value changed). The id is checked too, as a slot freed by pruning may hold
    # another row by now; `IS TRUE` keeps the planner from turning that check back into an
    # index lookup. What balsync remembers is updated in place where it had a memory of the
    # row (the update stays on its page: balsync.written's fillfactor) and inserted where
    # it had none. A row that already agrees is remembered as it stands, unwritten.
    row = conn.execute(
        sql.SQL(
            """WITH upd AS (
                   UPDATE {table} AS t SET {bal} = d.new{touch}
                   FROM pg_temp.balsync_delta d
                   WHERE {found} AND d.present AND d.old IS DISTINCT FROM d.new
                     AND t.{bal} IS NOT DISTINCT FROM d.old
                   RETURNING t.{id} AS id, d.new AS balance, d.wtid
               ){inserting}, seen AS (
                   SELECT id, balance, wtid FROM upd
                   UNION ALL
                   SELECT id, new, wtid FROM pg_temp.balsync_delta
                   WHERE present AND old IS NOT DISTINCT FROM new
               ), remembered AS (
                   UPDATE balsync.written w SET balance = u.balance, cleared = false
                   FROM seen u
                   WHERE w.ctid = u.wtid AND w.target_id = %(key)s AND w.telegram_id = u.id
               ), written AS (
                   INSERT INTO balsync.written (target_id, telegram_id, balance)
                   SELECT %(key)s, id, balance FROM {written_rows} {remember}
               )
               SELECT (SELECT count(*) FROM upd), {inserted}"""
        ).format(
            touch=touch,
            inserting=inserting,
            found=(
                sql.SQL("t.ctid = d.tid AND (t.{} = d.id) IS TRUE")
                if target.has_ctid
                else sql.SQL("t.{} = d.id")
            ).format(sql.Identifier(target.id_column)),
            written_rows=sql.SQL(
                "(SELECT id, balance FROM seen WHERE wtid IS NULL"
                " UNION ALL SELECT id, balance FROM ins) AS w"
                if target.can_insert
                else "seen WHERE wtid IS NULL"
            ),
            inserted=sql.SQL("(SELECT count(*) FROM ins)" if target.can_insert else "0"),
            remember=sql.SQL(_REMEMBER),
            **names,
        ),
        {"key": key},
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _remember(
    conn: Connection, target: TargetTable, pairs: Sequence[tuple[int, Decimal | str]]
) -> None:
    """Record values as what balsync last wrote (or saw agree) for these ids: in their rows
    where the table keeps memory there, else (and for ids with no row) in balsync.written."""
    if not pairs:
        return
    ids, balances = [i for i, _ in pairs], [str(b) for _, b in pairs]
    if target.memory_in_row:
        conn.execute(WRITING)
        names = _names(target)
        kept = {
            int(r[0])
            for r in conn.execute(
                sql.SQL(
                    """UPDATE {table} t SET balsync_written = u.b, balsync_cleared = false
                       FROM unnest(%s::bigint[], %s::numeric[]) AS u(i, b)
                       WHERE t.{id} = u.i RETURNING t.{id}"""
                ).format(**names),
                (ids, balances),
            )
        }
        rest = [(i, b) for i, b in zip(ids, balances, strict=True) if i not in kept]
        ids, balances = [i for i, _ in rest], [b for _, b in rest]
        if not ids:
            return
    conn.execute(
        """INSERT INTO balsync.written (target_id, telegram_id, balance)
           SELECT %s, i, b FROM unnest(%s::bigint[], %s::numeric[]) AS u(i, b) """
        + _REMEMBER,
        (_memory_id(conn, target), ids, balances),
    )


def _read_up_to(conn: Connection, table: TableName, position: Trust | None) -> None:
    """Record, with the batch, that balsync read the trusted server up to this point."""
    if position is not None and position.replid:
        conn.execute(
            """UPDATE balsync.redis_trust SET repl_offset = greatest(repl_offset, %s)
               WHERE target_table = %s AND redis_id = %s AND replid = %s""",
            (position.repl_offset, str(table), position.redis_id, position.replid),
        )


def _resolved_for_db(
    conn: Connection,
    target: TargetTable,
    counts: BatchCounts,
    resolve_in_redis: Callable[[list[Conflict]], set[int]],
) -> BatchCounts:
    """Give Redis the database's value where the database won; remember only what was set.

    Inside the batch's transaction, which writes no target row for these conflicts: if it
    rolls back after Redis was set, Redis and PostgreSQL agree anyway.
    """
    wanted = [c for c in counts.conflicts if c.resolution == "db"]
    if not wanted:
        return counts
    done = resolve_in_redis(wanted)
    _remember(conn, target, [(c.telegram_id, c.db_value) for c in wanted if c.telegram_id in done])
    conflicts = [
        c if c.resolution != "db" or c.telegram_id in done else replace(c, resolution="kept")
        for c in counts.conflicts
    ]
    return replace(counts, conflicts=conflicts)


def _conflicts(conn: Connection, policy: MergePolicy) -> list[Conflict]:
    """Rows of the delta that differ and must not simply be overwritten."""
    rows = conn.execute(
        """SELECT id, old, new, written FROM pg_temp.balsync_delta
           WHERE present AND old IS DISTINCT FROM new
             AND ((written IS NOT NULL AND written IS DISTINCT FROM old) OR %s)""",
        (policy.hold_updates,),
    ).fetchall()
    # After a Redis restart Redis may be the stale side: nothing is overwritten.
    kind: ConflictKind = "redis_restarted" if policy.hold_updates else "changed_in_db"
    return [
        Conflict(int(i), old, new, written, kind, policy.resolution(int(i), kind))
        for i, old, new, written in rows
    ]


def _unknown_ids(conn: Connection, target: TargetTable) -> list[int]:
    rows = conn.execute(
        sql.SQL(
            """SELECT s.id FROM pg_temp.balsync_stage s
               WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{id} = s.id)"""
        ).format(table=target.ident, id=sql.Identifier(target.id_column))
    ).fetchall()
    return [int(r[0]) for r in rows]


def _store_conflicts(conn: Connection, run_id: int, conflicts: Sequence[Conflict]) -> None:
    with conn.cursor().copy(
        """COPY balsync.conflicts
               (run_id, telegram_id, db_value, redis_value, last_written, kind, resolution)
           FROM STDIN"""
    ) as copy:
        for c in conflicts:
            copy.write_row(
                (
                    run_id,
                    c.telegram_id,
                    c.db_value,
                    c.redis_value,
                    c.last_written,
                    c.kind,
                    c.resolution,
                )
            )


def _store_skipped(conn: Connection, run_id: int, records: Sequence[InvalidRecord]) -> None:
    with conn.cursor().copy(
        "COPY balsync.skipped_records (run_id, key, raw_value, reason) FROM STDIN"
    ) as copy:
        for record in records:
            raw = None if record.raw is None else text_of(record.raw[:RAW_VALUE_LIMIT])
            copy.write_row((run_id, text_of(record.key), raw, record.reason))
