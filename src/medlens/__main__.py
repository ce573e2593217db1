"""`python -m medlens` runs the command line."""
import sys

from medlens.cli.group import main

sys.exit(main())
