"""Hostile configs, checkpoints and names: a YAML alias bomb (in a file and in --set), a recursive alias, a
``!!python`` tag, checkpoints whose pickle would run code, a text file as the teacher, and group names that
escape the root. Each is refused fast with one line and exit code 2; no payload ever runs, nothing is written
outside the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG

from .harness import Outcome, assert_one_line_error, cli, run_sets, tiny_cache, warm

pytestmark = pytest.mark.slow
TIMEOUT_S = 30  # a refused input fails in well under a second; an expanding bomb would run for minutes
MEMORY = 4 << 30  # and fail here (MemoryError) instead of taking the machine's memory

LOL = "[" + ", ".join(["lol"] * 9) + "]"
BOMB = "{a: &a " + LOL + ", " + ", ".join(
    f"{b}: &{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi")) + "}"  # 9^9 leaves


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    warm()
    return tiny_cache(tmp_path_factory.mktemp("hostile") / "cache")


def run(*argv: object) -> Outcome:
    return cli(*argv, timeout=TIMEOUT_S, memory_bytes=MEMORY)


class Evil:
    """Pickles as a call to ``os.system``: loading it with plain ``pickle`` would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_an_alias_bomb_in_a_config_file_fails_fast(cache: Path, tmp_path: Path) -> None:
    text = Path(DEFAULT_MODEL_CONFIG).read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith("kwargs:"))
    model = tmp_path / "model.yaml"
    model.write_text(text.replace(line, f"  kwargs: {BOMB}", 1))
    outcome = run("train", "--model-config", model, *run_sets(tmp_path / "run", cache), "--device", "cpu")
    line = assert_one_line_error(outcome, "model.yaml")
    print(f"\nattack alias bomb in a config file ({outcome.seconds:.2f} s): {line}")


@pytest.mark.parametrize("value", [BOMB, "&r {self: *r}", "&r [1, *r]"],
                         ids=["bomb", "recursive-map", "recursive-list"])
def test_an_alias_in_a_set_value_fails_fast(cache: Path, tmp_path: Path, value: str) -> None:
    outcome = run("train", *run_sets(tmp_path / "run", cache), "--set", f"model.teacher.kwargs={value}",
                  "--device", "cpu")
    line = assert_one_line_error(outcome, "model.teacher.kwargs")
    print(f"\nattack alias in --set ({outcome.seconds:.2f} s): {line}")


def test_a_python_tag_is_refused_and_never_runs(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    data = tmp_path / "data.yaml"
    data.write_text(Path(DEFAULT_DATA_CONFIG).read_text() + f"\nextra: {tag}\n")
    in_file = run("train", "--data-config", data, *run_sets(tmp_path / "run", cache), "--device", "cpu")
    assert_one_line_error(in_file, "data.yaml")
    in_set = run("train", *run_sets(tmp_path / "run", cache), "--set", f"model.teacher.kwargs={tag}", "--device", "cpu")
    assert_one_line_error(in_set, "model.teacher.kwargs")
    assert not marker.exists(), "a YAML tag ran code"
    print(f"\nattack python tag: {in_file.err_lines[-1]} / {in_set.err_lines[-1]}")


def test_checkpoints_with_a_pickle_payload_are_refused_for_safety(cache: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    student = tmp_path / "evil_student.pt"
    torch.save({"student": {"w": Evil(marker)}, "global_step": 1, "epoch": 0, "epoch_complete": True}, student)
    teacher = tmp_path / "evil_teacher.pt"
    torch.save({"conv.weight": Evil(marker)}, teacher)
    sets = run_sets(tmp_path / "run", cache)
    resumed = run("train", *sets, "--resume-from", student, "--device", "cpu")
    line = assert_one_line_error(resumed, "evil_student.pt")
    assert "refused" in line.lower() and "corrupt" not in line.lower() and "truncated" not in line.lower(), line
    for command in ("train", "cache-teacher"):
        outcome = run(command, *run_sets(tmp_path / f"run_{command}", cache),
                      "--set", f"model.teacher.checkpoint={teacher}", "--device", "cpu")
        line = assert_one_line_error(outcome, "evil_teacher.pt")
        assert "refused" in line.lower(), line
        print(f"\nattack pickle payload as teacher ({command}): {line}")
    assert not marker.exists(), "a checkpoint's pickle payload ran"
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    outcome = run("train", *sets, "--set", f"model.teacher.checkpoint={text}", "--device", "cpu")
    print(f"\nattack text file as teacher: {assert_one_line_error(outcome, 'notes.pt')}")


@pytest.mark.parametrize("name", ["../evil", "{tmp}/absolute", "a b", "teacher/../../x", ""])
def test_a_group_name_must_be_an_identifier(cache: Path, tmp_path: Path, name: str) -> None:
    name = name.format(tmp=tmp_path)
    before = sorted(p.name for p in cache.iterdir())
    outcome = run("cache-teacher", *run_sets(tmp_path / "run", cache), "--name", name, "--views", "1", "--topk", "2",
                  "--device", "cpu")
    assert_one_line_error(outcome, f"{name!r}")
    assert sorted(p.name for p in cache.iterdir()) == before, "a declaration was written for a bad name"
    assert not list(cache.parent.glob("*.fields.json")) and not list(tmp_path.glob("*.fields.json"))
