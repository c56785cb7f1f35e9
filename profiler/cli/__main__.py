"""``python -m attnprof.cli``: the attnprof command."""

import sys

from . import main

sys.exit(main())
