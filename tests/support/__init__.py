"""What the tests run on and read: embedded servers, the demo's data, PgBouncer, network and
tool lookups, a table another session holds locked, the deployment files, the metrics textfile."""
