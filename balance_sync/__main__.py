"""`python -m balance_sync` is the same CLI as the `balsync` console script."""

from balance_sync.cli import main

if __name__ == "__main__":
    main()
