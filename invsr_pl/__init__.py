"""invsr-pl: InvSR (CVPR 2025) diffusion-inversion super-resolution with Lightning + Hydra."""

__version__ = "0.1.0"
