"""`shardstore build-manifest` and `shardstore info` on a cache in object storage, the way a user meets them:
a cache synced to a bucket by ordinary tools, made readable without copying it back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shardstore.cli import main
from shardstore.store.reader import ShardStore
from tests.conftest import write_native


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_a_synced_bucket_is_made_readable_and_described(tmp_path: Path, s3_server, s3_proxy, bucket, aws_env,
                                                        capsys: pytest.CaptureFixture) -> None:
    root = write_native(tmp_path / "cache", 40, 8)  # written and synced without a manifest, like `aws s3 sync`
    s3_server.upload_tree(root, bucket, "imgs")
    url = f"s3://{bucket}/imgs"
    code, out, err = run(["build-manifest", url], capsys)
    assert code == 0, err
    assert f"wrote {url}/manifest.json" in out.replace("\n", "")
    # Only the headers were read: far fewer bytes than the shards hold.
    data = sum(p.stat().st_size for p in root.rglob("*.npy"))
    assert 0 < s3_proxy.total_bytes < data * 20  # tiny files come whole in their one GET; no file twice
    code, out, err = run(["info", url], capsys)
    assert code == 0, err
    assert re.search(r"│ shards\s*│ 5\s", out) and re.search(r"│ samples\s*│ 40\s", out), out
    code, out, _ = run(["build-manifest", url], capsys)
    assert code == 0 and "unchanged" in out
    store = ShardStore.open(url, local_cache=tmp_path / "node", cache_limit="16MB")
    assert store.num_samples == 40 and int(store.read(4, "labels")[0]) == 32 % 7


def test_a_url_of_an_unsupported_kind_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["info", "http://example.com/cache"], capsys)
    assert code == 2 and "s3://" in err and len(err.strip().splitlines()) == 1, err


def test_info_of_a_bucket_without_a_manifest_says_to_build_one(tmp_path: Path, s3_server, bucket, aws_env,
                                                               capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["info", f"s3://{bucket}/nothing"], capsys)
    assert code == 2 and "build-manifest" in err, err


def test_file_urls_work_without_credentials(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_native(tmp_path / "cache", 24, 8)
    code, out, err = run(["build-manifest", f"file://{root}"], capsys)
    assert code == 0, err
    assert json.loads((root / "manifest.json").read_text())["num_shards"] == 3
    code, out, err = run(["info", f"file://{root}"], capsys)
    assert code == 0 and re.search(r"│ samples\s*│ 24\s", out), out + err
