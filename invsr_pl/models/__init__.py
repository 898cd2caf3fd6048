"""Frozen SD-Turbo backbone, noise predictor and discriminator."""
