"""`python -m rlhf_loop ...` is the `rlhf` command (app/cli.py)."""

import sys

from rlhf_loop.app.cli import main

sys.exit(main())
