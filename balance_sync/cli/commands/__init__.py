"""The commands, grouped by what they touch; each parses, calls one operation, emits."""
