"""`make bench`: balsync's sync against the floor of the job, on a scratch prefix and database.

    python -m bench --n 1000000 [--repeat 3] [--rss-5n]   # the table, also in bench/results.md
    python -m bench --incremental-keys K --incremental-changed C   # sync --incremental's size
    python -m bench --no-incremental                     # the four scenarios alone
    python -m bench --profile SCENARIO [--n N]           # where one sync spends its time

Modules: `scratch` (the scratch keys and database, seeding, the state before each run),
`floor` (minimal scripts: what the job costs at least), `process` (balsync as a user runs
it, with its wall time and peak RSS), `harness` (the measurements), `report` (the table),
`profiling` (profile mode), `cli` (the options).
"""
