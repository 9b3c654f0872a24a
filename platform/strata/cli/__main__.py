"""`python -m strata.cli ARGS`, as the `strata` command."""

import sys

from strata.cli import main

sys.exit(main())
