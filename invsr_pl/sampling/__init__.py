"""Inversion sampler, timestep/sigma conventions, tiling and colour correction."""
