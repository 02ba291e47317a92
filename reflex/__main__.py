"""``python -m reflex``: the ``reflex`` command line (:mod:`reflex.cli`)."""

from reflex.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
