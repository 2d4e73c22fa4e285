"""`python -m bpfilter` runs the main command line."""

import sys

from bpfilter.cli import main

sys.exit(main())
