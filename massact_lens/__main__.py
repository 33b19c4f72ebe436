"""``python -m massact_lens ARGS`` is the ``massact`` command (:mod:`massact_lens.cli`)."""

import sys

from massact_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
