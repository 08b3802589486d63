import sys

from k2train.cli import main

sys.exit(main())
