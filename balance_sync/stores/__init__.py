"""The two stores: every SQL statement lives under `stores/postgres/`, every Redis command
under `stores/redis/`."""
