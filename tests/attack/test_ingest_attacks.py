"""``shardstore write --from-folder/--from-hf`` met by a hostile cache, hostile images and an unlucky user.

A tampered ``order.json`` or ``classes.json`` (nested too deep, out-of-range numbers, a link out of the root, a
directory, a FIFO) is one line, never a crash, a hang or a read outside the root; images in modes Pillow clips
(16-bit, float) keep their range; a decompression bomb, a FIFO named like an image and a truncated file are
skipped images; labels beyond int64 and sources without rows are one line; and in real processes a Ctrl-C
while the decoders start, a decoder killed with SIGKILL and a full disk each end the job at once with one line
(or none for Ctrl-C), no decoder left behind, nothing partial visible, and a rerun equal to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardstore.cli import main
from shardstore.errors import ShardstoreError
from shardstore.store import decode
from shardstore.store.decode import decode_chunk, decode_in_order, load_image
from shardstore.store.ingest import list_image_folder, write_image_folder
from tests.test_ingest import make_folder


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def one_line_cli(args: list[object], capsys: pytest.CaptureFixture) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def started(tmp_path: Path) -> tuple[Path, Path]:
    """A 10-image folder and a cache whose first job wrote shard 0 of it (shuffled), with order.json."""
    folder = make_folder(tmp_path / "imgs")
    root = tmp_path / "c"
    write_image_folder(root, folder, image_size=8, shard_size=4, num_shards=1, fsync=False, workers=1)
    return folder, root


# --- a tampered order.json / classes.json ---------------------------------------------------------------------------

RECORD = {"format": 1, "shuffle_seed": 0, "num_rows": 10, "order_sha256": "0" * 64}


@pytest.mark.parametrize("text", [
    b"[" * 100_000 + b"]" * 100_000,  # a RecursionError in the JSON parser, before
    json.dumps({**RECORD, "shuffle_seed": 10**400}).encode(),  # echoed as a 400-digit seed, before
    json.dumps({**RECORD, "num_rows": 10**400}).encode(),
    json.dumps({**RECORD, "shuffle_seed": True}).encode(),  # "pass --shuffle-seed True", before
    json.dumps({**RECORD, "shuffle_seed": -3}).encode(),
    b" " * (2 << 20),  # larger than any record: not read whole
], ids=["deep", "huge-seed", "huge-rows", "bool-seed", "negative-seed", "oversized"])
def test_a_tampered_order_json_is_one_line(started: tuple[Path, Path], text: bytes) -> None:
    folder, root = started
    (root / "order.json").write_bytes(text)
    with pytest.raises(ShardstoreError) as caught:
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False, workers=1)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{root / 'order.json'}: not a readable record of the order"), message


@pytest.mark.parametrize("name", ["order.json", "classes.json"])
def test_a_record_that_links_out_of_the_root_is_not_followed(started: tuple[Path, Path], tmp_path: Path,
                                                             name: str) -> None:
    folder, root = started
    outside = tmp_path / f"outside-{name}"
    shutil.move(root / name, outside)
    before = outside.read_bytes()
    (root / name).symlink_to(outside)
    with pytest.raises(ShardstoreError, match=rf"^{re.escape(str(root / name))}: .*symbolic link"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False, workers=1)
    assert outside.read_bytes() == before and (root / name).is_symlink()


@pytest.mark.parametrize("kind", ["directory", "fifo"])  # a link to /dev/zero: refused as a link, above
def test_a_record_that_is_no_file_is_refused_without_waiting(started: tuple[Path, Path], kind: str) -> None:
    folder, root = started
    path = root / "order.json"
    path.unlink()
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False, workers=1)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive() and kind == "fifo":  # release the reader blocked on the FIFO before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive(), f"reading a {kind} named order.json blocked"
    assert len(outcome) == 1 and isinstance(outcome[0], ShardstoreError), outcome
    assert "not a readable record" in str(outcome[0]) and "\n" not in str(outcome[0])


def test_a_deeply_nested_classes_json_is_one_line(started: tuple[Path, Path]) -> None:
    folder, root = started
    (root / "classes.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ShardstoreError, match=r"classes\.json: not a readable list of class names \(nested too"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False, workers=1)


# --- hostile and unusual images -------------------------------------------------------------------------------------


def test_16_bit_and_float_images_keep_their_range() -> None:
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    sixteen = load_image(encoded(Image.fromarray((ramp * 65535).astype(np.uint16)), "PNG"), 32)
    floats = load_image(encoded(Image.fromarray(ramp.astype(np.float32)), "TIFF"), 32)
    eight = load_image(encoded(Image.fromarray((ramp * 255).astype(np.uint8)), "PNG"), 32)
    # Pillow's plain convert("RGB") clips: the 16-bit ramp came out 234..255, the float one all 0.
    assert np.abs(sixteen.astype(int) - eight).max() <= 2
    assert np.abs(floats.astype(int) - eight).max() <= 2


@pytest.mark.parametrize("mode", ["CMYK", "LA", "P", "1", "RGBA", "I"])
def test_every_common_mode_decodes_to_rgb(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    out = load_image(encoded(img, "TIFF" if mode in ("CMYK", "I") else "PNG"), 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8


@pytest.mark.slow
def test_bombs_truncated_files_and_animations() -> None:
    frames = [Image.new("P", (30, 20), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    jpeg = encoded(Image.new("RGB", (40, 40), (200, 10, 10)), "JPEG")
    # 144 M pixels: between MAX_IMAGE_PIXELS and twice it, where Pillow only warns and decodes it whole.
    warned_bomb = encoded(Image.new("P", (12000, 12000)), "GIF")
    hard_bomb = encoded(Image.new("1", (20000, 20000)), "PNG")
    out = decode_chunk([buf.getvalue(), jpeg[: len(jpeg) // 2], warned_bomb, hard_bomb], 8)
    assert isinstance(out[0], np.ndarray) and out[0].shape == (3, 8, 8)
    assert isinstance(out[1], str) and "truncated" in out[1].lower()
    assert isinstance(out[2], str) and "decompression bomb" in out[2]
    assert isinstance(out[3], str) and "decompression bomb" in out[3]


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    fifo = folder / "cat" / "zzz.png"
    os.mkfifo(fifo)
    done: list[object] = []
    thread = threading.Thread(target=lambda: done.append(
        write_image_folder(tmp_path / "c", folder, image_size=8, shard_size=4, fsync=False, workers=1)), daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive(), "a FIFO in the image folder blocked the ingest"
    (report,) = done
    assert [what for what, _ in report.bad_inputs] == [str(fifo)]  # type: ignore[attr-defined]
    assert "not a regular file" in report.bad_inputs[0][1]  # type: ignore[attr-defined]


def test_an_empty_class_is_kept_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_folder(tmp_path / "imgs")
    (folder / "zz").mkdir()
    with caplog.at_level(logging.WARNING):
        listing = list_image_folder(folder)
    assert listing.classes[-1] == "zz" and "class 'zz' has no images" in caplog.text


# --- Hugging Face sources -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_labels_beyond_int64_and_sources_without_rows_are_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    png = encoded(Image.new("RGB", (9, 9)), "PNG")
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"image": pa.array([{"bytes": png, "path": None}] * 2, cell),
                             "label": pa.array([1, 2**64 - 1], pa.uint64())}), big)
    # Before: 2**64 - 1 became label -1, with a warning about "negative labels".
    line = one_line_cli(["write", tmp_path / "c1", "--from-hf", big, "--image-size", 8, "--workers", 1], capsys)
    assert "holds label 18,446,744,073,709,551,615, beyond int64" in line
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"image": pa.array([], cell), "label": pa.array([], pa.int64())}), empty)
    # Before: datasets logged "BatchSize must be greater than 0" twice and the error said "check the files".
    line = one_line_cli(["write", tmp_path / "c2", "--from-hf", empty, "--image-size", 8], capsys)
    assert line.endswith(f"{empty} holds no rows (1 Parquet file(s) of 0 rows); there are no images to write")
    saved = tmp_path / "saved"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a"])})
    datasets.Dataset.from_dict({"image": [], "label": []}, features=features).save_to_disk(str(saved))
    # Before: "cannot load ... (IndexError: list index out of range); check the files".
    line = one_line_cli(["write", tmp_path / "c3", "--from-hf", saved, "--image-size", 8], capsys)
    assert "is a saved dataset with no rows" in line
    assert not any((tmp_path / c).exists() for c in ("c1", "c2", "c3"))


# --- processes --------------------------------------------------------------------------------------------------


class _ExitsWhenUnpickled:
    def __reduce__(self) -> tuple[object, tuple[int]]:
        return os._exit, (3,)


@pytest.mark.slow
def test_a_dead_decoder_names_the_shuffled_rows_it_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    rows = np.array([7, 3, 12, 40, 1, 9, 22, 5])

    def fetch(chunk: np.ndarray) -> list[object]:
        return [_ExitsWhenUnpickled() if int(r) == 40 else b"" for r in chunk]

    monkeypatch.setattr(decode.os, "cpu_count", lambda: 1)
    with caplog.at_level(logging.WARNING), pytest.raises(ShardstoreError) as caught:
        list(decode_in_order(rows, fetch, 8, workers=2, chunk_rows=5))
    # Before: "source rows 7..1", as if a range of the source.
    assert "while decoding source rows 7, 3, 12, 40 and 1 more (" in str(caught.value)
    assert "2 decoding processes on 1 CPU cores" in caplog.text


def _marked(mark: str) -> list[int]:
    """Processes whose environment carries ``mark``: the CLI and every decoder it started."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if mark.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def _hf_source(path: Path, rows: int = 300, side: int = 40) -> Path:
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    cells = [{"bytes": encoded(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)), "PNG"),
              "path": None} for _ in range(rows)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    datasets.Dataset.from_dict({"image": cells, "label": [i % 5 for i in range(rows)]},
                               features=features).save_to_disk(str(path))
    return path


def _write(root: Path, source: Path, mark: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "SHARDSTORE_TEST_MARK": mark, "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([sys.executable, "-m", "shardstore", "write", str(root), "--from-hf", str(source),
                             "--image-size", "24", "--shard-size", "64", "--no-build-manifest", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _digests(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _wait_gone(mark: str, seconds: float = 10) -> list[int]:
    deadline = time.monotonic() + seconds
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _marked(mark)


@pytest.mark.slow
def test_ctrl_c_while_decoders_start_exits_at_once_and_a_rerun_equals_a_whole_run(tmp_path: Path) -> None:
    source = _hf_source(tmp_path / "ds")
    whole = tmp_path / "whole"
    assert _write(whole, source, uuid.uuid4().hex, "--workers", "1").wait(120) == 0
    root = tmp_path / "c"
    for delay_s in (0.0, 0.0, 0.02, 0.05):  # before: a traceback from a starting decoder, or a hang at exit
        mark = uuid.uuid4().hex
        proc = _write(root, source, mark, "--workers", "2")
        deadline = time.monotonic() + 60
        while len(_marked(mark)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)  # faulthandler shows where it hung
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the write hung after Ctrl-C: {err[-3000:]}")
        assert proc.returncode in (0, 130), err
        assert "Traceback" not in err and "Error" not in err, err
        assert _wait_gone(mark) == [], "decoding processes outlived the job"
        assert not [p for p in root.rglob(".*")], "a temporary was left visible"
    assert _write(root, source, uuid.uuid4().hex, "--workers", "2").wait(120) == 0
    assert _digests(root) == _digests(whole)


@pytest.mark.slow
def test_a_decoder_killed_mid_write_fails_in_one_line_and_leaves_no_process(tmp_path: Path) -> None:
    source = _hf_source(tmp_path / "ds")
    mark = uuid.uuid4().hex
    proc = _write(tmp_path / "c", source, mark, "--workers", "2")
    deadline = time.monotonic() + 60
    while len(_marked(mark)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    decoders = [pid for pid in _marked(mark) if pid != proc.pid and b"spawn_main" in
                Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert decoders, "no decoding process started"
    time.sleep(0.3)
    try:
        os.kill(decoders[0], signal.SIGKILL)
    except ProcessLookupError:
        pass  # the decoder had already exited (the write ended first): checked below
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    if proc.returncode == 0:  # it finished first: nothing to check
        pytest.skip("the write finished before the decoder was killed")
    assert proc.returncode == 2 and len(lines) == 1, err
    assert re.match(r"shardstore: error: a decoding process died while decoding source rows \d+, \d+, ", lines[0])
    assert _wait_gone(mark) == []


@pytest.mark.slow
def test_a_full_disk_during_an_hf_write_is_one_line(tmp_path: Path) -> None:
    source = _hf_source(tmp_path / "ds", rows=600, side=48)
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=False,
                             capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        mark = uuid.uuid4().hex
        proc = _write(mount / "c", source, mark, "--workers", "2", "--image-size", "48")
        _, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, err
        assert lines[0].startswith("shardstore: error: no space left on device: writing ")
        assert _wait_gone(mark) == []
        for shard in (mount / "c").glob("shard_*"):
            assert sorted(f.name for f in shard.iterdir()) == ["ids.npy", "images.npy", "labels.npy"]
            for f in shard.iterdir():
                np.load(f, allow_pickle=False)
        assert not [p for p in (mount / "c").rglob(".*")], "a temporary was left on the full disk"
    finally:
        subprocess.run(["umount", str(mount)], check=False)
