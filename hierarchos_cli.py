"""Thin entry point: `python hierarchos_cli.py <command> ...` (same as the `hierarchos` console script)."""

from hierarchos.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
