"""Random generators derived from ``(seed, epoch, stream)`` alone: no global state, no ``seed + epoch`` collisions."""

from __future__ import annotations

import numpy as np
import numpy.random  # noqa: F401  (NumPy loads it lazily: at import, not in a fresh process's first epoch plan)

# One stream per random decision, so changing one policy never shifts another's draws.
CHOOSE_SHARDS = 1
PERMUTATION = 2
VISIT_ORDER = 3
MIX = 4


def check_seed(seed: object) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise ``ValueError`` with the rule."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"random_subset_seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A generator for ``(seed, *key)``: a SeedSequence of the whole tuple, so (1, 0) and (0, 1) differ."""
    return np.random.default_rng([seed, *key])


def words_for(seed: int, *key: int, count: int) -> np.ndarray:
    """``count`` uint64 words for ``(seed, *key)``, from the same SeedSequence ``rng_for`` starts from.

    For keys of a keyed function (the round keys of ``permutation``'s bijection): no generator is built.
    """
    return np.random.SeedSequence([seed, *key]).generate_state(count, np.uint64)
