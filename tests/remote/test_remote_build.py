"""``build_remote_manifest`` against a real S3 API (moto on 127.0.0.1, through the counting proxy).

Caches are written locally with plain ``np.save``, uploaded the way ``aws s3 sync`` does (one PUT per
file), built in the bucket, and the bucket's manifest is compared with what a local build of the same
files gives. The proxy's hook records every request with its ``Range`` header, so the tests count header
GETs and see the order of the uploads.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from shardstore.errors import ManifestError
from shardstore.manifest.build import build_manifest
from shardstore.manifest.remote_build import build_remote_manifest
from shardstore.manifest.remote_mirror import SMALL_OBJECT_BYTES, needed_bytes, object_stamp, shard_key
from shardstore.remote.objects import ObjectInfo
from shardstore.store.manifest import Manifest
from shardstore.store.npy import HEAD_BYTES
from shardstore.store.snapshot import read_manifest

ROWS = 32  # images of 32 rows are 98 KB: larger than SMALL_OBJECT_BYTES, so only their header is fetched
REPO = Path(__file__).resolve().parents[2]


# -- caches and buckets ---------------------------------------------------------------------------------


def _arrays(shard_id: int, rows: int = ROWS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(shard_id)
    return {
        "images": rng.integers(0, 256, (rows, 3, 32, 32), dtype=np.uint8),
        "labels": (rng.integers(0, 10, rows) + shard_id).astype(np.int64),
        "logits": rng.standard_normal((rows, 10)).astype(np.float16),
    }


def write_native(root: Path, ids: range, rows: dict[int, int] | None = None) -> Path:
    for i in ids:
        d = root / f"shard_{i:06d}"
        d.mkdir(parents=True, exist_ok=True)
        for name, arr in _arrays(i, (rows or {}).get(i, ROWS)).items():
            np.save(d / f"{name}.npy", arr)
    return root


def write_flat(root: Path, ids: range) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in ids:
        for name, arr in _arrays(i, ROWS if i % 3 else ROWS - 7).items():
            np.save(root / f"{name}_{i:05d}.npy", arr)
    return root


class Recorder:
    """The proxy's ``on_request`` hook: every request as (method, key, Range header), in arrival order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()

    def __call__(self, method: str, key: str, headers) -> None:
        with self._lock:
            self.calls.append((method, key, headers.get("Range")))

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()

    def ranged_gets(self) -> list[str]:
        return [k for m, k, r in self.calls if m == "GET" and r]

    def of(self, method: str) -> list[str]:
        """The object keys (``bucket/key``) of the requests with this method (a LIST is a GET of the bucket)."""
        return [k for m, k, _ in self.calls if m == method and k.partition("/")[2]]


@pytest.fixture
def recorder(s3_proxy) -> Recorder:
    rec = Recorder()
    s3_proxy.on_request = rec
    return rec


def _download(s3_server, bucket: str, prefix: str, into: Path) -> Manifest:
    """The bucket's manifest.json and its tables, downloaded, and read as a local reader reads them."""
    client = s3_server.boto3_client()
    start = f"{prefix}/" if prefix else ""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=start).get("Contents", [])
    for obj in listed:
        rel = obj["Key"][len(start):]
        if rel == "manifest.json" or rel.startswith("manifest.d/"):
            path = into / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
    return read_manifest(into, check="all")


def _keys(s3_server, bucket: str) -> list[str]:
    listed = s3_server.boto3_client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def _same_table(remote: Manifest, local: Manifest) -> None:
    """Same fields, shards, counts, offsets and ranges; mtimes differ (object stamps, not the local files')."""
    assert remote.fields == local.fields
    assert remote.left_out == local.left_out
    assert remote.num_shards == local.num_shards > 0
    skip = {n for n in local.columns if n.endswith(".mtime_ns")} | {"since"}
    assert set(remote.columns) == set(local.columns)
    for name in sorted(set(local.columns) - skip):
        assert np.array_equal(np.asarray(remote.columns[name]), np.asarray(local.columns[name])), name


def _build(url: str, tmp_path: Path, **kwargs):
    return build_remote_manifest(url, mirror_dir=tmp_path / "mirror", **kwargs)


# -- pure helpers ---------------------------------------------------------------------------------------


def test_shard_keys_follow_the_discovery_rules() -> None:
    assert shard_key("shard_000042/images.npy") == ("images", 42)
    assert shard_key("labels_0007.npy") == ("labels", 7)
    for other in ("manifest.json", "manifest.d/0123456789abcdef-01234567/id.npy", "shard_000001/.images.npy.tmp-1-ab",
                  "shard_000001/sub/images.npy", "notes.txt", "shard_000001/", "images.fields.json"):
        assert shard_key(other) is None, other


def test_needed_bytes_is_the_header_and_the_labels_of_a_label_file(tmp_path: Path) -> None:
    np.save(tmp_path / "img.npy", np.zeros((100, 3, 32, 32), np.uint8))
    np.save(tmp_path / "lab.npy", np.arange(5000, dtype=np.int64))
    img, lab = (tmp_path / "img.npy").read_bytes(), (tmp_path / "lab.npy").read_bytes()
    assert needed_bytes(img[:HEAD_BYTES], len(img)) == HEAD_BYTES  # the header is inside: nothing more
    assert needed_bytes(img[:20], len(img)) == 128  # the rest of the header
    assert needed_bytes(lab[:HEAD_BYTES], len(lab)) == len(lab)  # a label file's values are read too
    assert needed_bytes(b"not an npy file at all", 10**6) == 22  # the build reports it from what it has


def test_object_stamp_changes_with_the_etag_within_one_second() -> None:
    a = ObjectInfo("k", 10, '"aaa"', None, 1_700_000_000_123_000_000)
    b = ObjectInfo("k", 10, '"bbb"', None, 1_700_000_000_456_000_000)
    assert object_stamp(a) != object_stamp(b)
    assert object_stamp(a) // 10**9 == 1_700_000_000
    assert object_stamp(a) == object_stamp(ObjectInfo("k", 10, '"aaa"', None, 1_700_000_000_999_000_000))
    assert object_stamp(ObjectInfo("k", 10, None, None, None)) is None


# -- against the S3 server ------------------------------------------------------------------------------


@pytest.mark.slow  # over 0.3 s
def test_native_cache_in_s3_gets_the_manifest_a_local_build_writes(tmp_path, s3_server, bucket, aws_env, s3_proxy,
                                                                   recorder) -> None:
    local = write_native(tmp_path / "cache", range(5), rows={4: 9})
    s3_server.upload_tree(local, bucket, prefix="caches/v1")
    recorder.clear()
    s3_proxy.reset()
    report = _build(f"s3://{bucket}/caches/v1", tmp_path)
    assert report.problems == [] and report.path is None
    assert report.manifest_url == f"s3://{bucket}/caches/v1/manifest.json"
    expected = build_manifest(local, write=False).manifest
    _same_table(_download(s3_server, bucket, "caches/v1", tmp_path / "down"), expected)
    # Each shard file: one ranged GET; an image file only its first page, never the whole object.
    gets = recorder.ranged_gets()
    assert sorted(gets) == sorted(f"{bucket}/caches/v1/shard_{i:06d}/{n}.npy" for i in range(5)
                                  for n in ("images", "labels", "logits"))
    stats = s3_proxy.stats()
    image_bytes = sum((local / f"shard_{i:06d}/images.npy").stat().st_size for i in range(4))
    fetched = [stats[f"{bucket}/caches/v1/shard_{i:06d}/images.npy"].body_bytes for i in range(5)]
    assert fetched[:4] == [HEAD_BYTES] * 4 and sum(fetched[:4]) < image_bytes / 20
    assert fetched[4] == (local / "shard_000004/images.npy").stat().st_size <= SMALL_OBJECT_BYTES  # (a small one)
    assert report.headers_fetched == 15 and report.requests["GET"] == 15
    assert len(recorder.of("GET")) == 15  # no GET without a Range


@pytest.mark.slow
def test_flat_cache_in_s3_gets_the_manifest_a_local_build_writes(tmp_path, s3_server, bucket, aws_env,
                                                                 recorder) -> None:
    local = write_flat(tmp_path / "cache", range(1, 7))
    s3_server.upload_tree(local, bucket)
    report = _build(f"s3://{bucket}", tmp_path)
    assert report.problems == [] and report.manifest.num_shards == 6
    _same_table(_download(s3_server, bucket, "", tmp_path / "down"), build_manifest(local, write=False).manifest)
    assert len(recorder.ranged_gets()) == 18


def test_the_table_records_each_object_stamp_as_its_mtime(tmp_path, s3_server, bucket, aws_env) -> None:
    from shardstore.remote.clients import open_client

    s3_server.upload_tree(write_native(tmp_path / "cache", range(2)), bucket)
    _build(f"s3://{bucket}", tmp_path)
    m = _download(s3_server, bucket, "", tmp_path / "down")
    listed = {i.key: i for i in open_client(f"s3://{bucket}").list("")}
    for p in range(m.num_shards):
        for name in m.fields:
            rel = m.file_path(p, name)
            assert int(m.columns[f"{name}.mtime_ns"][p]) == object_stamp(listed[rel])


@pytest.mark.slow
def test_nothing_changed_reads_no_header(tmp_path, s3_server, bucket, aws_env, recorder) -> None:
    s3_server.upload_tree(write_native(tmp_path / "cache", range(4)), bucket)
    first = _build(f"s3://{bucket}", tmp_path)
    assert not first.unchanged
    recorder.clear()
    second = _build(f"s3://{bucket}", tmp_path)
    assert second.unchanged and second.headers_fetched == 0
    assert recorder.ranged_gets() == []
    assert recorder.of("PUT") == [] and recorder.of("DELETE") == []
    # only the listing and the manifest (the header and its columns, fetched whole)
    assert all(k.startswith(f"{bucket}/manifest") for k in recorder.of("GET"))
    recorder.clear()
    third = _build(f"s3://{bucket}", tmp_path)  # the mirror holds the bucket's manifest now: nothing to fetch
    assert third.unchanged and recorder.of("GET") == [] and third.requests == {"LIST": 1}


@pytest.mark.slow
def test_k_new_shards_cost_k_shards_of_header_gets(tmp_path, s3_server, bucket, aws_env, recorder) -> None:
    local = write_native(tmp_path / "cache", range(4))
    s3_server.upload_tree(local, bucket)
    _build(f"s3://{bucket}", tmp_path)
    write_native(tmp_path / "more", range(4, 7))
    s3_server.upload_tree(tmp_path / "more", bucket)
    recorder.clear()
    report = _build(f"s3://{bucket}", tmp_path)
    gets = recorder.ranged_gets()
    assert sorted(gets) == sorted(f"{bucket}/shard_{i:06d}/{n}.npy" for i in range(4, 7)
                                  for n in ("images", "labels", "logits"))
    assert report.headers_fetched == 9 and report.manifest.num_shards == 7
    write_native(local, range(4, 7))
    _same_table(_download(s3_server, bucket, "", tmp_path / "down"), build_manifest(local, write=False).manifest)


def _damage(root: Path) -> None:
    """A truncated image file, labels of the wrong dtype, a file that is not .npy, fields of unequal length."""
    path = root / "shard_000001/images.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    np.save(root / "shard_000002/labels.npy", np.zeros(ROWS, np.float32))
    (root / "shard_000003/logits.npy").write_bytes(b"this is not an npy file" * 10)
    np.save(root / "shard_000004/labels.npy", np.zeros(ROWS - 1, np.int64))


@pytest.mark.slow
def test_damaged_objects_are_reported_as_a_local_build_reports_them(tmp_path, s3_server, bucket, aws_env) -> None:
    local = write_native(tmp_path / "cache", range(7))
    _damage(local)
    s3_server.upload_tree(local, bucket)
    report = _build(f"s3://{bucket}", tmp_path)
    expected = build_manifest(local, write=False)
    assert len(report.problems) == 4
    assert [str(p) for p in report.problems] == [str(p) for p in expected.problems]
    assert "truncated" in str(report.problems[0])
    _same_table(_download(s3_server, bucket, "", tmp_path / "down"), expected.manifest)


@pytest.mark.slow
def test_an_object_damaged_after_a_build_is_fetched_again_and_reported(tmp_path, s3_server, bucket, aws_env,
                                                                       recorder) -> None:
    local = write_native(tmp_path / "cache", range(4))
    s3_server.upload_tree(local, bucket)
    _build(f"s3://{bucket}", tmp_path)
    path = local / "shard_000002/images.npy"
    path.write_bytes(path.read_bytes()[:-1])
    s3_server.boto3_client().put_object(Bucket=bucket, Key="shard_000002/images.npy", Body=path.read_bytes())
    recorder.clear()
    report = _build(f"s3://{bucket}", tmp_path)
    assert recorder.ranged_gets() == [f"{bucket}/shard_000002/images.npy"]
    assert [p.path for p in report.problems] == ["shard_000002/images.npy"]
    assert [str(p) for p in report.problems] == [str(p) for p in build_manifest(local, write=False).problems]


def test_a_lost_mirror_costs_requests_not_correctness(tmp_path, s3_server, bucket, aws_env, recorder) -> None:
    local = write_native(tmp_path / "cache", range(3))
    s3_server.upload_tree(local, bucket)
    _build(f"s3://{bucket}", tmp_path)
    shutil.rmtree(tmp_path / "mirror")
    recorder.clear()
    report = _build(f"s3://{bucket}", tmp_path)
    assert len(recorder.ranged_gets()) == 9 and report.unchanged


@pytest.mark.slow
def test_an_object_deleted_from_the_bucket_leaves_the_mirror(tmp_path, s3_server, bucket, aws_env) -> None:
    local = write_native(tmp_path / "cache", range(3))
    s3_server.upload_tree(local, bucket)
    _build(f"s3://{bucket}", tmp_path)
    s3_server.boto3_client().delete_object(Bucket=bucket, Key="shard_000001/logits.npy")
    report = _build(f"s3://{bucket}", tmp_path)
    assert not (tmp_path / "mirror/tree/shard_000001/logits.npy").exists()
    (local / "shard_000001/logits.npy").unlink()
    (local / "manifest.json").unlink(missing_ok=True)
    expected = build_manifest(local, write=False)
    assert [str(p) for p in report.problems] == [str(p) for p in expected.problems]
    assert "field 'logits' is missing" in str(report.problems[0])
    _same_table(_download(s3_server, bucket, "", tmp_path / "down"), expected.manifest)


@pytest.mark.slow
def test_the_header_is_put_after_every_column_and_old_tables_go(tmp_path, s3_server, bucket, aws_env,
                                                                recorder) -> None:
    s3_server.upload_tree(write_native(tmp_path / "cache", range(2)), bucket)
    tables = []
    for round_ in range(3):
        write_native(tmp_path / f"more{round_}", range(2 + round_, 3 + round_))
        s3_server.upload_tree(tmp_path / f"more{round_}", bucket)
        recorder.clear()
        report = _build(f"s3://{bucket}", tmp_path)
        puts = recorder.of("PUT")
        assert puts[-1] == f"{bucket}/manifest.json"
        table = report.manifest.source[1]
        columns = [k for k in puts[:-1] if k.startswith(f"{bucket}/manifest.d/{table}/")]
        assert len(columns) == len(puts) - 1 == len(report.manifest.columns)
        tables.append(table)
    keys = _keys(s3_server, bucket)
    present = {k.split("/")[1] for k in keys if k.startswith("manifest.d/")}
    assert present == {tables[1], tables[2]}  # the current table and the one before it; the first is deleted
    assert report.requests["DELETE"] == len(report.manifest.columns)  # the first table's columns, no other object


@pytest.mark.slow
def test_only_column_files_of_old_tables_are_deleted(tmp_path, s3_server, bucket, aws_env) -> None:
    s3_server.upload_tree(write_native(tmp_path / "cache", range(2)), bucket)
    first = _build(f"s3://{bucket}", tmp_path).manifest.source[1]
    client = s3_server.boto3_client()
    for key in (f"manifest.d/{first}/notes.txt", "manifest.d/readme.md", "notes.txt"):
        client.put_object(Bucket=bucket, Key=key, Body=b"a user's file")
    for i in (2, 3):
        write_native(tmp_path / f"more{i}", range(i, i + 1))
        s3_server.upload_tree(tmp_path / f"more{i}", bucket)
        _build(f"s3://{bucket}", tmp_path)
    keys = _keys(s3_server, bucket)
    assert f"manifest.d/{first}/notes.txt" in keys and "manifest.d/readme.md" in keys and "notes.txt" in keys
    assert not [k for k in keys if k.startswith(f"manifest.d/{first}/") and k.endswith(".npy")]


@pytest.mark.slow
def test_a_build_killed_before_the_header_leaves_the_old_manifest(tmp_path, s3_server, bucket, aws_env, s3_proxy,
                                                                  recorder) -> None:
    local = write_native(tmp_path / "cache", range(3))
    s3_server.upload_tree(local, bucket)
    old = _build(f"s3://{bucket}", tmp_path).manifest
    write_native(tmp_path / "more", range(3, 5))
    s3_server.upload_tree(tmp_path / "more", bucket)

    child: list[subprocess.Popen] = []

    def kill_at_the_header(method: str, key: str, headers) -> None:
        recorder(method, key, headers)
        if method == "PUT" and key == f"{bucket}/manifest.json":
            os.kill(child[0].pid, signal.SIGKILL)
            child[0].wait()
            raise RuntimeError("the build was killed")  # (answered 500 to a process that is gone)

    s3_proxy.on_request = kill_at_the_header
    recorder.clear()
    code = ("import sys; from shardstore.manifest.remote_build import build_remote_manifest; "
            "build_remote_manifest(sys.argv[1], mirror_dir=sys.argv[2])")
    child.append(subprocess.Popen([sys.executable, "-c", code, f"s3://{bucket}", str(tmp_path / "mirror")], cwd=REPO,
                                  stderr=subprocess.DEVNULL))
    assert child[0].wait(timeout=120) == -signal.SIGKILL
    columns = [k for k in recorder.of("PUT") if "/manifest.d/" in k]
    assert columns and recorder.of("PUT")[-1] == f"{bucket}/manifest.json"
    # The bucket still holds the old header, and the table it names whole.
    seen = _download(s3_server, bucket, "", tmp_path / "down")
    assert seen.snapshot_id == old.snapshot_id and seen.num_shards == 3
    _same_table(seen, build_manifest(write_native(tmp_path / "old", range(3)), write=False).manifest)
    # The next build finishes the job and removes the table the killed one left behind.
    s3_proxy.on_request = recorder
    report = _build(f"s3://{bucket}", tmp_path)
    assert report.manifest.num_shards == 5
    orphan = {k.split("/")[2] for k in columns}
    assert not orphan & {k.split("/")[1] for k in _keys(s3_server, bucket) if k.startswith("manifest.d/")}
    write_native(local, range(3, 5))
    _same_table(_download(s3_server, bucket, "", tmp_path / "down2"), build_manifest(local, write=False).manifest)


@pytest.mark.slow
def test_checksums_of_a_synced_local_manifest_are_kept_and_checked(tmp_path, s3_server, bucket, aws_env) -> None:
    local = write_native(tmp_path / "cache", range(3))
    build_manifest(local, checksum=True)  # manifest.json and its table go to the bucket with the shards
    s3_server.upload_tree(local, bucket)
    report = _build(f"s3://{bucket}", tmp_path)
    assert report.changed == []
    m = _download(s3_server, bucket, "", tmp_path / "down")
    assert all(m.checksummed(n).all() for n in m.fields)
    mirror_file = tmp_path / "mirror/tree/shard_000001/images.npy"
    assert mirror_file.stat().st_blocks * 512 < mirror_file.stat().st_size / 4  # sparse again after hashing
    # an object replaced by another content of the same size: the build says so, as it would on a disk
    arr = np.load(local / "shard_000001/images.npy")
    np.save(local / "shard_000001/images.npy", 255 - arr)
    s3_server.upload_tree(local / "shard_000001", bucket, prefix="shard_000001")
    report = _build(f"s3://{bucket}", tmp_path)
    assert [p.path for p in report.changed] == ["shard_000001/images.npy"]
    assert "content changed since its checksum was recorded" in str(report.changed[0])


def test_checksum_is_refused_for_a_bucket(tmp_path) -> None:
    with pytest.raises(ManifestError, match=r"^--checksum is not available for a cache in object storage "
                                            r"\(s3://b/c\): it would download every object"):
        build_remote_manifest("s3://b/c", checksum=True, mirror_dir=tmp_path / "m")


def test_an_empty_bucket_names_the_url_not_the_mirror(tmp_path, s3_server, bucket, aws_env) -> None:
    with pytest.raises(ManifestError, match=rf"^no shards in s3://{bucket}; expected shard_<id>/<field>.npy"):
        _build(f"s3://{bucket}", tmp_path)


def test_a_directory_that_is_not_a_mirror_is_refused(tmp_path) -> None:
    own = write_native(tmp_path / "mine", range(1))
    with pytest.raises(ManifestError, match=r"is not a build mirror \(it lacks mirror.lock\) and is not empty"):
        build_remote_manifest(f"file://{tmp_path / 'cache'}", mirror_dir=own)
    assert (own / "shard_000000/images.npy").exists()


def test_a_file_url_builds_like_a_bucket(tmp_path) -> None:
    local = write_flat(tmp_path / "cache", range(3))
    report = build_remote_manifest(f"file://{local}", mirror_dir=tmp_path / "mirror")
    assert report.headers_fetched == 9 and report.problems == []
    _same_table(read_manifest(local, check="all"), build_manifest(local, write=False).manifest)


@pytest.mark.slow
def test_group_declarations_come_along(tmp_path, s3_server, bucket, aws_env) -> None:
    from shardstore.store.groups import GroupSpec, write_group_spec

    local = write_native(tmp_path / "cache", range(3))
    write_group_spec(local, GroupSpec("teacher", {"teacher_logits": (np.dtype(np.float32), (10,))}))
    for i in (0, 2):
        np.save(local / f"shard_{i:06d}/teacher_logits.npy", np.ones((ROWS, 10), np.float32))
    s3_server.upload_tree(local, bucket)
    report = _build(f"s3://{bucket}", tmp_path)
    expected = build_manifest(local, write=False)
    assert "teacher_logits" in report.manifest.fields
    assert [str(p) for p in report.incomplete_groups] == [str(p) for p in expected.incomplete_groups]
    _same_table(_download(s3_server, bucket, "", tmp_path / "down"), expected.manifest)


def test_small_objects_come_whole_in_their_one_get(tmp_path, s3_server, bucket, aws_env, s3_proxy) -> None:
    s3_server.upload_tree(write_native(tmp_path / "cache", range(1)), bucket)
    s3_proxy.reset()
    _build(f"s3://{bucket}", tmp_path)
    stats = s3_proxy.stats()
    for name in ("labels", "logits"):
        size = (tmp_path / f"cache/shard_000000/{name}.npy").stat().st_size
        assert size <= SMALL_OBJECT_BYTES
        assert stats[f"{bucket}/shard_000000/{name}.npy"].body_bytes == size
        assert stats[f"{bucket}/shard_000000/{name}.npy"].count("GET") == 1


def test_an_object_replaced_while_its_header_is_read_is_read_in_its_new_version(tmp_path, s3_server, bucket,
                                                                                aws_env, s3_proxy) -> None:
    local = write_native(tmp_path / "cache", range(3))
    s3_server.upload_tree(local, bucket)
    target = f"{bucket}/shard_000001/labels.npy"
    np.save(local / "shard_000001/labels.npy", np.arange(ROWS - 4, dtype=np.int64))  # now of unequal length
    replaced = []

    def replace_once(method: str, key: str, headers) -> None:
        if method == "GET" and key == target and not replaced:
            replaced.append(headers.get("If-Match"))
            s3_server.boto3_client().put_object(Bucket=bucket, Key="shard_000001/labels.npy",
                                                Body=(local / "shard_000001/labels.npy").read_bytes())

    s3_proxy.on_request = replace_once
    report = _build(f"s3://{bucket}", tmp_path)
    assert replaced and replaced[0]  # the GET named the listed version, so the store refused it (412)
    assert report.requests.get("HEAD") == 1
    assert [str(p) for p in report.problems] == [str(p) for p in build_manifest(local, write=False).problems]
    assert "fields of unequal length" in str(report.problems[0])


@pytest.mark.slow
def test_transient_failures_of_header_gets_are_retried(tmp_path, s3_server, bucket, aws_env, s3_proxy) -> None:
    local = write_native(tmp_path / "cache", range(2))
    s3_server.upload_tree(local, bucket)
    s3_proxy.fail_next(503, n=2, predicate=lambda method, key, headers: method == "GET" and "images" in key)
    report = _build(f"s3://{bucket}", tmp_path)
    assert report.problems == [] and report.requests["GET"] == 6 + 2
    _same_table(_download(s3_server, bucket, "", tmp_path / "down"), build_manifest(local, write=False).manifest)


def test_one_build_per_mirror_at_a_time(tmp_path) -> None:
    import fcntl

    local = write_native(tmp_path / "cache", range(1))
    build_remote_manifest(f"file://{local}", mirror_dir=tmp_path / "mirror")
    with open(tmp_path / "mirror/mirror.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ManifestError, match=r"^another build-manifest of file://.* is running on this machine "
                                                r"\(it holds .*mirror.lock\); wait for it to finish"):
            build_remote_manifest(f"file://{local}", mirror_dir=tmp_path / "mirror")


def test_a_mirror_written_when_its_machine_went_down_is_fetched_again(tmp_path) -> None:
    local = write_native(tmp_path / "cache", range(2))
    build_remote_manifest(f"file://{local}", mirror_dir=tmp_path / "mirror")
    # What a power loss can leave: a file with its size and stamp, whose data never reached the disk.
    torn = tmp_path / "mirror/tree/shard_000001/images.npy"
    st = torn.stat()
    torn.write_bytes(bytes(st.st_size))
    os.utime(torn, ns=(st.st_mtime_ns, st.st_mtime_ns))
    (tmp_path / "mirror/state.json").write_text('{"boot": "another boot", "clean": false}')
    report = build_remote_manifest(f"file://{local}", mirror_dir=tmp_path / "mirror", full=True)
    assert report.headers_fetched == 6 and report.problems == []


@pytest.mark.slow
def test_full_reads_every_header_from_the_mirror_not_the_bucket(tmp_path, s3_server, bucket, aws_env,
                                                                recorder) -> None:
    local = write_native(tmp_path / "cache", range(3))
    s3_server.upload_tree(local, bucket)
    _build(f"s3://{bucket}", tmp_path)
    recorder.clear()
    report = _build(f"s3://{bucket}", tmp_path, full=True)
    assert recorder.ranged_gets() == [] and report.headers_read >= 9
    assert recorder.of("PUT")[-1] == f"{bucket}/manifest.json"
    _same_table(_download(s3_server, bucket, "", tmp_path / "down"), build_manifest(local, write=False).manifest)
