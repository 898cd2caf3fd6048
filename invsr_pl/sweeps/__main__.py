"""``python -m invsr_pl.sweeps DIR``: see :mod:`invsr_pl.cli.sweep_summary`."""

import sys

from invsr_pl.cli.sweep_summary import main

sys.exit(main())
