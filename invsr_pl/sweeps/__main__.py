"""``python -m invsr_pl.sweeps DIR``: see :mod:`invsr_pl.sweeps.command`."""

import sys

from invsr_pl.sweeps.command import main

sys.exit(main())
