"""``python -m mindtrace.jobs``: the ``mindtrace-jobs`` command."""

from __future__ import annotations

import sys

from mindtrace.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
