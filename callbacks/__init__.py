"""Lightning callbacks: EMA of the noise predictor, image logging."""
