"""balsync: persist user balances from Redis into PostgreSQL in one-shot, batched runs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("balsync")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
