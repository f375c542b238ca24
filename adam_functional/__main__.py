"""``python -m adam_functional``: a short tour of the package (see ``--help``)."""

from adam_functional._demo import main

if __name__ == "__main__":
    raise SystemExit(main())
