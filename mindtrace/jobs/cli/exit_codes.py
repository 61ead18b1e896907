"""The exit codes of the ``mindtrace-jobs`` command (after BSD's sysexits.h)."""

from __future__ import annotations

#: A clean run or shutdown; ``check``: the broker answered.
EXIT_OK = 0
#: A failed operator command (job not found, a queue that does not exist).
EXIT_FAILED = 1
#: Bad command line (argparse's own code).
EXIT_USAGE = 2
#: The broker is unreachable (``check``, and operator commands; a worker keeps retrying instead).
EXIT_UNAVAILABLE = 69
#: The broker refused us: bad credentials, an unknown vhost, no permission.
EXIT_REFUSED = 77
#: Bad configuration: an import path that does not resolve, an invalid URL or option.
EXIT_CONFIG = 78
