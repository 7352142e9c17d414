"""One module per operation the CLI offers; each returns a typed result and never prints."""
