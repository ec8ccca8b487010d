"""`python -m fileproxy`: the same as the `fileproxy` command."""

import sys

from fileproxy.cli import main

sys.exit(main())
