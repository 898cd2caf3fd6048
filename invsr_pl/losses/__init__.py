"""Latent LPIPS and adversarial losses."""
