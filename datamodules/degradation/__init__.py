"""Real-ESRGAN synthetic degradation as pure batched tensor ops."""
