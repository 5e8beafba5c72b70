"""``shardstore coverage``: per epoch, the shards a policy takes and how much of the cache has been seen."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from shardstore.cli.app import app, out
from shardstore.cli.train import DataConfigOption
from shardstore.errors import ConfigError

POLICIES = ("random", "permutation")
SHOWN_IDS = 8
"""Shard ids listed per epoch before the rest is summarised as ``... (+N)``."""

EXPECTATION = {
    "random": "expected: 1 - (1 - k/N)^E; each epoch misses a shard with probability 1 - k/N, independently of other "
              "epochs, so the share of samples is the same whatever the shard sizes",
    "permutation": "expected: min(1, E*k/N); every shard once per cycle, the first cycle's E*k shards a random subset",
}

SEEN = ("samples seen: every sample of a visited shard (max_steps_per_epoch and the dropped last batch not applied); "
        "sd: over seeds, in percentage points.")


@app.command(short_help="Per epoch: the shards each policy takes and the share of samples seen so far.")
def coverage(
    epochs: Annotated[int, typer.Option("--epochs", metavar="E", help="Epochs to draw (1 or more).")],
    data_config: DataConfigOption = None,
    plot: Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png",
                                                help="Also draw the curves (each policy and its expectation) "
                                                     "into this PNG; needs matplotlib.")] = None,
    policy: Annotated[str, typer.Option("--shard-policy", "--policy", metavar="random|permutation|both",
                                        help="The shard_policy to draw epochs with (--policy: the former "
                                             "spelling).")] = "both",
) -> None:
    """Per epoch: the shards each policy takes and the share of the cache's samples seen so far.

    Needs: a cache with a manifest at data_config's cache_root (shards_per_epoch and
    random_subset_seed come from the same file). Reads only the manifest.

    Beside the share seen, the expected share over seeds (± one standard deviation): for random
    1 - (1 - k/N)^E, for permutation min(1, E*k/N). A sample counts as seen once its shard was
    visited (max_steps_per_epoch and the dropped last batch are not applied).
    """
    from shardstore.config.data import load_data_config
    from shardstore.config.resolve import DEFAULT_DATA_CONFIG
    from shardstore.sampling.coverage import coverage as draw_coverage
    from shardstore.sampling.plan import EpochSpec
    from shardstore.store.reader import ShardStore

    policies = _policies(policy)
    if isinstance(epochs, bool) or epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    config = load_data_config(data_config or DEFAULT_DATA_CONFIG)
    store = ShardStore.open(config.cache_root)  # the manifest's counts are all it needs: no shard is read
    counts = np.diff(store.offsets)
    k = config.shards_per_epoch
    curves = []
    for name in policies:
        try:
            spec = EpochSpec(shards_per_epoch=k, random_subset_seed=config.random_subset_seed, shard_policy=name)
        except ValueError as exc:
            raise ConfigError(f"{data_config or DEFAULT_DATA_CONFIG}: {exc}") from None
        curves.append(draw_coverage(counts, spec, epochs))
    per_epoch = store.num_shards if k is None else min(k, store.num_shards)
    for curve in curves:
        table = Table(title=f"{curve.policy}: {per_epoch:,} of {store.num_shards:,} shards per epoch, seed "
                            f"{config.random_subset_seed}, {store.num_samples:,} samples ({store.root})",
                      title_justify="left", caption=f"{EXPECTATION[curve.policy]}. {SEEN}", caption_justify="left")
        for column in ("epoch", "shards (ids, visit order)", "new samples", "shards seen", "samples seen",
                       "expected ± sd"):
            table.add_column(column, justify="left" if column.startswith("shards (") else "right")
        for e in range(epochs):
            spread = curve.expected_std[e]
            table.add_row(f"{e + 1}", _ids(store.shard_ids[curve.positions[e]]), f"{curve.new_samples[e]:,}",
                          f"{curve.seen_shards[e]:,}", f"{100 * curve.seen_fraction[e]:.2f}%",
                          f"{100 * curve.expected[e]:.2f}%" + (f" ± {100 * spread:.2f}" if spread >= 5e-5 else ""))
        out.print(table)
    if plot is not None:
        path = _plot(curves, Path(plot), f"{per_epoch:,} of {store.num_shards:,} shards per epoch, seed "
                                         f"{config.random_subset_seed}")
        out.print(f"wrote {path}", markup=False)


def _policies(policy: str) -> tuple[str, ...]:
    if policy == "both":
        return POLICIES
    if policy in POLICIES:
        return (policy,)
    close = difflib.get_close_matches(policy, [*POLICIES, "both"], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"--shard-policy must be random, permutation or both, got {policy!r}{hint}")


def _ids(ids: np.ndarray) -> str:
    """The first ``SHOWN_IDS`` ids, then how many more."""
    shown = ", ".join(str(i) for i in ids[:SHOWN_IDS].tolist())
    return shown + (f", ... (+{ids.size - SHOWN_IDS:,})" if ids.size > SHOWN_IDS else "")


def _plot(curves: list, path: Path, title: str) -> Path:
    """Each policy's share of samples seen per epoch (markers) over its expectation (dashed, ±1 sd shaded)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError('--plot needs matplotlib; install it with `pip install -e ".[plot]"` '
                          "(or `pip install matplotlib`)") from None
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: the folder {path.parent} does not exist; create it or choose another path")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for curve, color in zip(curves, ("tab:blue", "tab:orange")):
        x = np.arange(1, curve.seen_fraction.size + 1)
        ax.plot(x, curve.expected, "--", color=color, lw=1, label=f"{curve.policy}: expected")
        ax.fill_between(x, curve.expected - curve.expected_std, curve.expected + curve.expected_std, color=color,
                        alpha=0.15, lw=0)
        ax.plot(x, curve.seen_fraction, "o-", color=color, ms=3, lw=1.2, label=f"{curve.policy}: this seed")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs")
    ax.set_ylabel("share of samples seen")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title} (shaded: expected ± 1 sd over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ConfigError(f"--plot {path}: cannot be written ({exc.strerror or exc}); choose another path") from None
    finally:
        plt.close(fig)
    return path
