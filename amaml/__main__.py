import sys

from amaml.cli import main

sys.exit(main())
