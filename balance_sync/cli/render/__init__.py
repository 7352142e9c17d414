"""Rich views of results for people, one module per command family; the core never prints."""
