"""``python -m data_tools``: see data_tools/cli.py."""

import sys

from data_tools.cli import main

sys.exit(main())
