"""`python -m vlab`: the `vlab` command."""
import sys

from .cli import main

sys.exit(main())
