"""Redis, where the application keeps balances hot."""
