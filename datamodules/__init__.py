"""Training and evaluation data: HR folders, paired sets, Real-ESRGAN degradations, DataModule."""
