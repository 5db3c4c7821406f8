"""Command line: ``python -m adasmooth_ext`` (installed as ``adasmooth``)."""

from .cli import main

if __name__ == "__main__":
    main()
