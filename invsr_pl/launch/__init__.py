"""Assembling a run from its Hydra config: start-up checks; trainer, callback and logger instantiation."""
