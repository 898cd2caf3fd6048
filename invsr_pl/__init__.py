"""invsr-pl: InvSR (CVPR 2025) diffusion-inversion super-resolution with Lightning + Hydra.

Importing the package imports nothing heavy (no torch, no diffusers): the commands' ``--help`` and
``--cfg job`` stay fast, and each module imports what it uses. It installs the quiet-by-default log filters
(:mod:`invsr_pl.utils.quiet`; ``INVSR_VERBOSE=1`` turns them off) before any submodule imports diffusers,
because bitsandbytes logs its kernel warning while diffusers imports it.
"""

from invsr_pl.utils.quiet import quiet_dependencies

__version__ = "0.1.0"

quiet_dependencies()
