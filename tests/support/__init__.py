"""What the tests run on: embedded servers, the demo, PgBouncer, network and tool lookups."""
