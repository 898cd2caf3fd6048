"""Transitional alias of :mod:`invsr_pl.models.timesteps`, the one home of the timestep conventions.

The conventions moved next to the networks so that models never import from ``sampling``; import them from
``invsr_pl.models.timesteps``. This alias goes once no caller uses the old path.
"""

from invsr_pl.models.timesteps import *  # noqa: F403
from invsr_pl.models.timesteps import __all__  # noqa: F401
