"""The seed helper: one named stream per random decision, values that never move, and no derivation beside it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from shardstore.sampling import seeds

TRAINING_STREAMS = ["TRAIN_VIEWS", "PICK_STORED_VIEW", "LIVE_TEACHING", "CACHED_VIEWS", "STUDENT_INIT", "TEACHER_INIT",
                    "CHECK_SAMPLES"]
PLAN_STREAMS = ["CHOOSE_SHARDS", "PERMUTATION", "VISIT_ORDER", "MIX"]


def test_every_stream_has_its_own_value() -> None:
    values = [getattr(seeds, name) for name in TRAINING_STREAMS + PLAN_STREAMS]
    assert len(set(values)) == len(values)


@pytest.mark.parametrize(("stream", "alone", "with_rank_2"), [
    # Pinned: stored teacher views and resumed runs are drawn again from these, so they must never change.
    ("TRAIN_VIEWS", 1573761072, 1502324651),
    ("PICK_STORED_VIEW", 3721078879, 1131388631),
    ("LIVE_TEACHING", 2650306700, 1201021141),
    ("CACHED_VIEWS", 520457843, 2866092975),
    ("STUDENT_INIT", 3401515907, 3388263339),
    ("TEACHER_INIT", 3072563428, 1630598217),
    ("CHECK_SAMPLES", 854069483, 430934330),
])
def test_derived_seeds_never_move(stream: str, alone: int, with_rank_2: int) -> None:
    tag = getattr(seeds, stream)
    assert seeds.derive_seed(7, stream=tag) == alone
    assert seeds.derive_seed(7, 2, stream=tag) == with_rank_2
    assert seeds.derive_seed(8, stream=tag) != alone  # the seed matters
    assert seeds.derive_seed(2, 7, stream=tag) != with_rank_2  # and the key's order does


def test_words_for_and_rng_for_start_from_the_same_sequence() -> None:
    words = seeds.words_for(3, 1, 4, count=2)
    assert words.dtype == np.uint64 and words.tolist() == np.random.SeedSequence([3, 1, 4]).generate_state(
        2, np.uint64).tolist()
    assert seeds.rng_for(3, 1, 4).integers(1 << 30) == np.random.default_rng([3, 1, 4]).integers(1 << 30)


def test_no_random_decision_derives_its_own_seed() -> None:
    """A hex tag or a SeedSequence beside the helper would be a stream nobody can find: only seeds.py makes them."""
    package = Path(seeds.__file__).parents[1]
    pattern = re.compile(r"SeedSequence\(|default_rng\(|manual_seed\((?!derive_seed\()|0x[0-9A-Fa-f]{8}\b")
    allowed = {"sampling/seeds.py",
               "sampling/shards.py",  # splitmix64's finalizer constants
               "store/order.py",  # the ingest shuffle: its own documented PCG64 stream of --shuffle-seed
               "demo.py",  # the demo's synthetic data
               "kd/augment.py"}  # turns a derived seed's word into a torch.Generator
    found = [f"{path.relative_to(package)}:{n}: {line.strip()}"
             for path in sorted(package.rglob("*.py")) if str(path.relative_to(package)) not in allowed
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line.split("#")[0]) and not line.lstrip().startswith(('"', "#"))]
    assert found == []
