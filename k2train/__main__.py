"""`python -m k2train`: the command line, whose entry point lives with the launchers (launch/cli.py)."""

import sys

from launch.cli import main

sys.exit(main())
