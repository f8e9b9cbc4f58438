"""python -m data_tools <subcommand>: see data_tools.cli."""
import sys

from data_tools.cli import main

sys.exit(main())
