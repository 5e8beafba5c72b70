"""``shardstore coverage``: its tables, ``--plot``, the default data config, and user errors as one line, exit 2."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstore import build_manifest
from shardstore.cli import main
from shardstore.sampling.coverage import coverage
from shardstore.sampling.plan import EpochSpec
from tests.conftest import write_native

SHARDS, SHARD_SIZE = 13, 10  # 12 full shards and one of 7


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    write_native(tmp_path / "cache", (SHARDS - 1) * SHARD_SIZE + 7, SHARD_SIZE)
    build_manifest(tmp_path / "cache")
    path = tmp_path / "data.yaml"
    path.write_text("cache_root: cache\nshards_per_epoch: 4\nrandom_subset_seed: 3\n")
    return path


def rows(out: str, policy: str) -> list[list[str]]:
    """The cells of the table titled ``policy: ...``."""
    table = out.split(f"{policy}: ")[1].split("└")[0]
    return [[cell.strip() for cell in line.strip("│").split("│")] for line in table.splitlines()
            if re.match(r"│\s+\d+ │", line)]


def test_tables_show_each_epochs_shards_and_the_share_seen(config: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(["coverage", "--data-config", str(config), "--epochs", "5"], capsys)
    assert code == 0 and err == ""
    assert "random: 4 of 13 shards per epoch, seed 3, 127 samples" in out
    assert "expected: 1 - (1 - k/N)^E" in out and "expected: min(1, E*k/N)" in out
    counts = np.array([SHARD_SIZE] * (SHARDS - 1) + [7])
    for policy in ("random", "permutation"):
        curve = coverage(counts, EpochSpec(shards_per_epoch=4, random_subset_seed=3, shard_policy=policy), 5)
        table = rows(out, policy)
        assert [r[0] for r in table] == ["1", "2", "3", "4", "5"]
        for e, r in enumerate(table):
            assert r[1] == ", ".join(map(str, curve.positions[e].tolist()))  # ids are positions in this cache
            assert r[2] == f"{curve.new_samples[e]:,}" and r[3] == str(curve.seen_shards[e])
            assert r[4] == f"{100 * curve.seen_fraction[e]:.2f}%"
            spread = f" ± {100 * curve.expected_std[e]:.2f}" if curve.expected_std[e] >= 5e-5 else ""
            assert r[5] == f"{100 * curve.expected[e]:.2f}%{spread}"
    assert [r[4] for r in rows(out, "permutation")][3:] == ["100.00%", "100.00%"]  # ceil(13 / 4) = 4 epochs
    assert rows(out, "random")[0][5] == "30.77% ± 1.09"  # 4/13; the short shard makes the share vary


@pytest.mark.parametrize("spelling", ["--data-config", "--data_config"])
def test_one_policy_and_both_spellings(config: Path, capsys: pytest.CaptureFixture, spelling: str) -> None:
    code, out, _ = run(["coverage", spelling, str(config), "--epochs", "2", "--policy", "permutation"], capsys)
    assert code == 0 and "permutation: 4 of 13" in out and "random:" not in out


def test_many_shards_are_abbreviated(config: Path, capsys: pytest.CaptureFixture) -> None:
    config.write_text("cache_root: cache\nshards_per_epoch: 11\n")
    code, out, _ = run(["coverage", "--data-config", str(config), "--epochs", "1", "--shard-policy", "random"], capsys)
    assert code == 0
    shown = rows(out, "random")[0][1]
    assert shown.endswith(", ... (+3)") and len(shown.split(", ")) == 9


def test_default_data_config_is_trains(config: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import shardstore.config.resolve as resolve

    monkeypatch.setattr(resolve, "DEFAULT_DATA_CONFIG", config)
    code, out, _ = run(["coverage", "--epochs", "1"], capsys)
    assert code == 0 and "4 of 13 shards per epoch, seed 3" in out


@pytest.mark.slow
def test_plot_writes_a_png(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "coverage.png"
    code, out, err = run(["coverage", "--data-config", str(config), "--epochs", "6", "--plot", str(png)], capsys)
    assert code == 0 and err == "" and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardstore: error: "), err
    assert "Traceback" not in err + out
    return lines[0]


def test_plot_without_matplotlib_names_the_extra(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = run(["coverage", "--data-config", str(config), "--epochs", "2", "--plot",
                          str(tmp_path / "c.png")], capsys)
    assert 'pip install -e ".[plot]"' in one_line_error(code, out, err)
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-config", "{tmp}/missing.yaml", "--epochs", "2"], "missing.yaml: no such file; pass --data-config"),
        (["--data-config", "{cfg}", "--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--data-config", "{cfg}", "--epochs", "-3"], "--epochs must be at least 1, got -3"),
        (["--data-config", "{cfg}"], "Missing option '--epochs'"),
        (["--data-config", "{cfg}", "--epochs", "two"], "Invalid value for '--epochs'"),
        (["--data-config", "{cfg}", "--epochs", "2", "--policy", "permutaton"],
         "--shard-policy must be random, permutation or both, got 'permutaton'; did you mean 'permutation'?"),
        (["--data-config", "{nocache}", "--epochs", "2"], "does not exist"),
        (["--data-config", "{cfg}", "--epochs", "2", "--plot", "{tmp}/no/such/dir/c.png"], "does not exist; create it"),
    ],
)
def test_user_errors_are_one_line_exit_2(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                         args: list[str], message: str) -> None:
    nocache = tmp_path / "nocache.yaml"
    nocache.write_text("cache_root: nowhere\n")
    args = [a.format(tmp=tmp_path, cfg=config, nocache=nocache) for a in args]
    line = one_line_error(*run(["coverage", *args], capsys))
    assert message in line, line
