"""What a run tells the world besides its result: logs, metrics, pings."""
