"""Help as a user reads it: bare `shardstore`, -h on every command, --version, flags shown as flags, prerequisites."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import typer

from shardstore.cli import app, main
from tests.conftest import write_native

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_command_is_listed() -> None:
    assert {"build-manifest", "info", "verify", "write", "train", "cache-teacher", "plot", "demo"} <= set(COMMANDS)


def test_bare_shardstore_prints_the_help_and_exits_0(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("Usage: shardstore [OPTIONS] COMMAND [ARGS]...")
    for name in COMMANDS:
        assert re.search(rf"^  {name}\s+\S", out, re.M), name
    assert "..." not in out.split("Commands:")[1]  # no summary is cut short


@pytest.mark.slow
def test_bare_shardstore_in_a_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "shardstore"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: shardstore") and proc.stderr == ""


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_h_and_help_on_the_program(capsys: pytest.CaptureFixture, flag: str) -> None:
    code, out, _ = run([flag], capsys)
    assert code == 0 and "-h, --help" in out and "--version" in out


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_takes_h_and_says_what_it_needs_first(capsys: pytest.CaptureFixture, name: str) -> None:
    code, out, err = run([name, "-h"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"Usage: shardstore {name} ")
    description = out.split("Options:")[0]
    paragraphs = [p.strip() for p in description.split("\n\n") if p.strip()]
    assert paragraphs[2].startswith("Needs: "), paragraphs  # usage, summary, then what it needs
    assert "<bool>" not in out and "-h, --help" in out


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out == f"shardstore {metadata.version('shardstore')}\n"
    import shardstore

    assert shardstore.__version__ == metadata.version("shardstore")


def test_flags_are_shown_and_parsed_as_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, out, _ = run(["build-manifest", "-h"], capsys)
    assert re.search(r"^  --checksum\s+Also hash every new file", out, re.M), out
    root = write_native(tmp_path / "c", 10, 4)
    assert run(["build-manifest", "--checksum", str(root)], capsys)[0] == 0
    code, out, _ = run(["verify", str(root)], capsys)
    assert code == 0 and "0 bad" in out
    code, _, err = run(["build-manifest", "--checksum", "true", str(root)], capsys)
    assert err == ("shardstore: error: --checksum is a flag and takes no value (got `--checksum true`); write "
                   "`--checksum` to turn it on, nothing to leave it off (see `shardstore build-manifest -h`)\n")
    assert code == 2
    code, _, err = run(["write", str(tmp_path / "new"), "--from-npy", "x=y.npy", "--build-manifest", "no"], capsys)
    assert code == 2 and "write `--build-manifest` to turn it on, `--no-build-manifest` to turn it off" in err
    assert not (tmp_path / "new").exists()


def test_a_root_named_like_a_word_still_works(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_native(tmp_path / "1", 6, 4)
    monkeypatch.chdir(tmp_path)
    assert run(["build-manifest", "--checksum", "1"], capsys)[0] == 0
    _, out, _ = run(["write", "-h"], capsys)
    assert "--build-manifest / --no-build-manifest" in out


def test_verify_help_names_build_manifest_checksum(capsys: pytest.CaptureFixture) -> None:
    _, out, _ = run(["verify", "-h"], capsys)
    assert "Needs: checksums recorded in the manifest by `shardstore build-manifest --checksum ROOT`" in \
        " ".join(out.split())


def test_train_options_are_documented(capsys: pytest.CaptureFixture) -> None:
    _, out, _ = run(["train", "-h"], capsys)
    text = " ".join(out.split())
    assert "--resume-from CHECKPOINT Continue from this checkpoint file" in text
    assert "--device DEVICE cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is available, else cpu)" in text
    _, out, _ = run(["-h"], capsys)
    assert "-v, --verbose Log what the library does" in " ".join(out.split())
