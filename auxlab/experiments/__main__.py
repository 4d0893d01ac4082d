"""``python -m auxlab.experiments --help``: see :mod:`auxlab.experiments`."""

from auxlab.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
