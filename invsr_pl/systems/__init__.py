"""Lightning systems: they orchestrate models, losses and metrics (training, evaluation, latent LPIPS)."""
