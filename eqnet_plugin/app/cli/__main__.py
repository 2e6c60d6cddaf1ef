"""``python -m eqnet_plugin.app.cli``: the `eqnet` command line."""
import sys

from . import main

sys.exit(main())
