"""Every random decision's seed, derived from ``(seed, key..., stream)`` alone: no global state, no ``seed + epoch``
collisions, and one named stream per decision, so changing one never shifts another's draws."""

from __future__ import annotations

import numpy as np
import numpy.random  # noqa: F401  (NumPy loads it lazily: at import, not in a fresh process's first epoch plan)

# Streams of ``random_subset_seed`` (the epoch plan), with ``rng_for(seed, epoch, stream)``.
CHOOSE_SHARDS = 1
PERMUTATION = 2
VISIT_ORDER = 3
MIX = 4

# Streams of the training seed (``train_config_kd.yaml``'s ``seed``), with ``derive_seed``. Their values are
# ASCII tags and never change: a resumed run and a stored teacher cache's views are drawn again from them.
TRAIN_VIEWS = 0x56494557  # "VIEW": each rank's augmentation views, and which stored view a sample trains on
PICK_STORED_VIEW = 0x5049434B  # "PICK": under TRAIN_VIEWS, the choice among a sample's stored views
LIVE_TEACHING = 0x4C495645  # "LIVE": whether a step of hybrid teaching runs the teacher (the same on every rank)
CACHED_VIEWS = 0x43414348  # "CACH": the views a teacher cache stores, per shard
STUDENT_INIT = 0x53545544  # "STUD": the student's initial weights (the same on every rank)
TEACHER_INIT = 0x54454143  # "TEAC": a teacher built without a checkpoint (smoke runs, tests)
CHECK_SAMPLES = 0x43484543  # "CHEC": the samples and views `cache-teacher --check` recomputes


def check_seed(seed: object) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise ``ValueError`` with the rule."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"random_subset_seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A generator for ``(seed, *key)``: a SeedSequence of the whole tuple, so (1, 0) and (0, 1) differ."""
    return np.random.default_rng([seed, *key])


def derive_seed(seed: int, *key: int, stream: int) -> int:
    """A 32-bit seed for ``stream`` of ``seed`` (and ``key``, e.g. the rank): the first word of SeedSequence
    ``[seed, *key, stream]``. Step-level generators are drawn from it with ``words_for(it, step, count=1)``."""
    return int(np.random.SeedSequence([seed, *key, stream]).generate_state(1)[0])


def words_for(seed: int, *key: int, count: int) -> np.ndarray:
    """``count`` uint64 words for ``(seed, *key)``, from the same SeedSequence ``rng_for`` starts from.

    For keys of a keyed function (the round keys of ``permutation``'s bijection): no generator is built.
    """
    return np.random.SeedSequence([seed, *key]).generate_state(count, np.uint64)
