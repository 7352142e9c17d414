"""PostgreSQL, the durable store."""
