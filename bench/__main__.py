"""``python -m bench``: see :mod:`bench.cli`."""

import sys

from bench.cli import main

try:
    sys.exit(main())
except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: everything was stopped on the way out
    print(f"bench interrupted ({e}); all its processes are stopped", file=sys.stderr)
    sys.exit(130)
