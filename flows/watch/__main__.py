"""``python -m polysemantic_disentangle.flows.watch``: the watcher's command line."""

import sys

from polysemantic_disentangle.flows.watch.cli import main

sys.exit(main())
