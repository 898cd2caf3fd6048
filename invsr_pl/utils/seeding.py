"""Stable seeds: the one way the project derives a generator seed from (seed, rank, worker, name, ...)."""

from __future__ import annotations

import hashlib

# The default seed of every SR path (invsr-sr --seed, the demo, InvSRPipeline with generator=None): the
# official sample-sd-turbo.yaml seed (docs/sampling.md).
DEFAULT_SEED = 12345


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends only on ``parts`` (never on Python's per-process ``hash()`` salt).

    Used wherever a seed must be the same on every machine and every run: per rank / worker / iteration
    generators, per image synthetic degradations (make_testset, samples). Distinct parts give independent
    streams, e.g. ``stable_seed(seed, "degradation", rank)`` vs ``stable_seed(seed, "iteration", rank, k)``.
    """
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
