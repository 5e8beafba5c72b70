"""Field groups: fields added to existing shards later, all or none per shard (ROOT/<group>.fields.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from shardstore import ManifestError, ShardStore, build_manifest
from shardstore.store.groups import GroupSpec, add_shard_fields, remove_stale_temporaries, write_group_spec
from shardstore.store.manifest import Manifest
from tests.conftest import write_flat, write_native

GROUP = GroupSpec("teacher", {"teacher_logits": (np.dtype(np.float16), (5,)),
                              "teacher_top": (np.dtype(np.int16), (2,))}, {"model": "resnet", "k": 2})
BASE = {"feats", "images", "labels"}
TEACHER = set(GROUP.fields)


def teacher_arrays(n: int, start: int = 0) -> dict[str, np.ndarray]:
    """Group values that encode the global sample index, so a misplaced row is detectable."""
    idx = np.arange(start, start + n)
    return {"teacher_logits": (idx[:, None] * 10 + np.arange(5)).astype(np.float16),
            "teacher_top": np.stack([idx, -idx], axis=1).astype(np.int16)}


def fill(root: Path, positions: list[int]) -> Manifest:
    """Write the group into the shards at ``positions`` of a fresh build, then build again."""
    m = build_manifest(root).manifest
    for p in positions:
        shard = m.shards[p]
        start = sum(s.num_samples for s in m.shards[:p])
        add_shard_fields({n: root / shard.field_path(n) for n in GROUP.fields},
                         teacher_arrays(shard.num_samples, start), fsync=False)
    return m


@pytest.fixture
def grouped(native_cache: Path) -> Path:
    """The 3-shard native cache (rows 4, 4, 2) with group ``teacher`` declared and written to shards 0 and 2."""
    write_group_spec(native_cache, GROUP)
    fill(native_cache, [0, 2])
    return native_cache


def test_group_on_some_shards_is_listed_and_readable_through_a_subset(grouped: Path) -> None:
    report = build_manifest(grouped)
    assert report.problems == [] and report.incomplete_groups == []
    m = report.manifest
    assert {n: (f.dtype, f.shape, f.group) for n, f in m.fields.items() if n in TEACHER} == {
        "teacher_logits": (np.dtype(np.float16), (5,), "teacher"),
        "teacher_top": (np.dtype(np.int16), (2,), "teacher"),
    }
    assert all(m.fields[n].group is None for n in BASE)
    assert [set(s.files) for s in m.shards] == [BASE | TEACHER, BASE, BASE | TEACHER]
    assert m.shards[2].files["teacher_top"].path == "shard_000002/teacher_top.npy"
    assert m.positions_with(["teacher_logits"]).tolist() == [0, 2]
    assert m.positions_with(["images"]).tolist() == [0, 1, 2]
    assert m.positions_with(["images", "teacher_top"]).tolist() == [0, 2]

    store = ShardStore.open(grouped)
    assert set(store.fields) == BASE and set(store.all_fields) == BASE | TEACHER
    assert set(store.shard(1)) == BASE and set(store.sample(5)) == BASE
    with pytest.raises(KeyError, match=r"shard 1 has no 'teacher_logits' \(its group 'teacher' was not written"):
        store.field(1, "teacher_logits")

    part = store.subset(m.positions_with(["teacher_logits", "teacher_top"]))
    assert set(part.fields) == BASE | TEACHER and part.shard_ids.tolist() == [0, 2]
    want = teacher_arrays(10)
    np.testing.assert_array_equal(part.field(0, "teacher_logits"), want["teacher_logits"][0:4])
    np.testing.assert_array_equal(part.field(1, "teacher_top"), want["teacher_top"][8:10])
    got = part.sample(5)  # subset id 5 = shard 2, row 1 = global sample 9
    assert got["teacher_top"].tolist() == [9, -9] and got["labels"] == 9 % 7
    np.testing.assert_array_equal(got["teacher_logits"], want["teacher_logits"][9])

    only = store.select(["images"])
    assert list(only.fields) == ["images"] and list(only.all_fields) == ["images"]
    assert all(list(s.files) == ["images"] for s in only.shards)
    picked = store.subset([0, 2]).select(["teacher_top"])
    assert list(picked.fields) == ["teacher_top"] and picked.sample(0)["teacher_top"].tolist() == [0, 0]


def test_positions_with_a_field_the_manifest_lacks_is_empty_or_names_it(grouped: Path) -> None:
    m = build_manifest(grouped).manifest
    try:
        positions = m.positions_with(["images", "nope"]).tolist()
    except KeyError as exc:  # a clear refusal is as good as no positions
        assert "no field 'nope'" in str(exc)
    else:
        assert positions == []


def test_incomplete_or_bad_group_files_are_reported_and_the_shard_kept(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 24, 4)  # shards 0..5, 4 rows each
    write_group_spec(root, GROUP)
    fill(root, [0, 1, 2, 3, 4, 5])
    (root / "shard_000001" / "teacher_top.npy").unlink()  # only part of the group
    np.save(root / "shard_000002" / "teacher_logits.npy", np.zeros((4, 5), np.float32))  # wrong dtype
    np.save(root / "shard_000003" / "teacher_top.npy", np.zeros((3, 2), np.int16))  # wrong row count
    (root / "shard_000004" / "teacher_logits.npy").write_bytes(b"not numpy")  # unreadable
    np.save(root / "shard_000005" / "teacher_top.npy", np.zeros((4, 3), np.int16))  # wrong shape
    report = build_manifest(root)
    assert report.problems == [] and [s.id for s in report.manifest.shards] == [0, 1, 2, 3, 4, 5]
    assert [set(s.files) for s in report.manifest.shards] == [BASE | TEACHER] + [BASE] * 5
    got = {p.shard_id: (p.path, p.reason) for p in report.incomplete_groups}
    assert sorted(got) == [1, 2, 3, 4, 5] and len(report.incomplete_groups) == 5
    assert got[1][0] == "shard_000001/teacher_top.npy" and got[1][1].startswith("missing")
    assert got[2][0] == "shard_000002/teacher_logits.npy"
    assert got[2][1].startswith("is float32[5], the group declares float16[5]")
    assert got[3][0] == "shard_000003/teacher_top.npy" and got[3][1].startswith("has 3 rows, the shard 4")
    assert got[4][0] == "shard_000004/teacher_logits.npy"
    assert got[4][1].startswith("not an .npy file")
    assert got[5][0] == "shard_000005/teacher_top.npy" and got[5][1].startswith("is int16[3], the group declares")
    assert all(reason.endswith("the shard is used without group 'teacher'; write the group's files again")
               for _, reason in got.values())
    store = ShardStore.open(root)
    assert set(store.fields) == BASE and store.manifest.positions_with(["teacher_top"]).tolist() == [0]


def test_majority_rule_does_not_apply_to_group_fields(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 16, 4)  # 4 shards
    write_group_spec(root, GROUP)
    fill(root, [0, 1, 2])  # 3 of 4 shards have the group
    report = build_manifest(root)
    assert report.problems == [] and report.incomplete_groups == [] and report.ignored_fields == {}
    assert [s.id for s in report.manifest.shards] == [0, 1, 2, 3]
    assert report.manifest.positions_with(list(TEACHER)).tolist() == [0, 1, 2]
    # Without the declaration the same files are ordinary majority fields and shard 3 would be left out.
    (root / "teacher.fields.json").unlink()
    undeclared = build_manifest(root)
    assert [p.shard_id for p in undeclared.problems] == [3] and "is missing" in undeclared.problems[0].reason


def test_json_round_trip_version_1_and_partial_group_rejected(grouped: Path) -> None:
    m = build_manifest(grouped).manifest
    again = Manifest.from_json(m.to_json())
    assert again.to_json() == m.to_json() and again.snapshot_id == m.snapshot_id
    assert {n: f.group for n, f in again.fields.items()} == {n: f.group for n, f in m.fields.items()}
    assert again.fields["teacher_top"].group == "teacher" and again.positions_with(["teacher_top"]).tolist() == [0, 2]
    doc = json.loads(m.to_json())
    assert doc["version"] == 2 and doc["fields"]["teacher_logits"]["group"] == "teacher"
    assert "group" not in doc["fields"]["images"]

    doc["shards"][0]["files"].pop("teacher_top")  # shard 0 lists only part of the group
    with pytest.raises(ManifestError, match=r"src.json: shard 0 lists fields .*group 'teacher' only in part"):
        Manifest.from_json(json.dumps(doc), "src.json")

    v1 = json.loads(m.to_json())
    v1["version"] = 1
    v1["fields"] = {n: {k: v for k, v in f.items() if k != "group"} for n, f in v1["fields"].items() if n in BASE}
    for s in v1["shards"]:
        s["files"] = {n: f for n, f in s["files"].items() if n in BASE}
    old = Manifest.from_json(json.dumps(v1))
    assert set(old.fields) == BASE and all(f.group is None for f in old.fields.values())
    assert [s.num_samples for s in old.shards] == [4, 4, 2]
    v1["shards"][1]["files"].pop("labels")  # in version 1 every field is required
    with pytest.raises(ManifestError, match="shard 1 lists fields"):
        Manifest.from_json(json.dumps(v1))


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"teacher.fields.json": "{not json"}, r"teacher\.fields\.json: bad field-group declaration"),
        ({"teacher.fields.json": json.dumps({"format": "other"})}, r"teacher\.fields\.json: bad field-group"),
        ({"other.fields.json": GROUP.to_json()},
         r"other\.fields\.json declares group 'teacher'; its file name must be teacher\.fields\.json"),
        ({"a.fields.json": GroupSpec("a", {"a_b_x": (np.dtype(np.float16), (2,))}).to_json(),
          "a_b.fields.json": GroupSpec("a_b", {"a_b_x": (np.dtype(np.float32), ())}).to_json()},
         r"field 'a_b_x' is declared by both .*a\.fields\.json and .*a_b\.fields\.json"),
    ],
)
def test_bad_declarations_fail_the_build(native_cache: Path, files: dict[str, str], match: str) -> None:
    for name, text in files.items():
        (native_cache / name).write_text(text)
    with pytest.raises(ManifestError, match=match):
        build_manifest(native_cache)
    assert not (native_cache / "manifest.json").exists()


def test_spec_json_round_trip(tmp_path: Path) -> None:
    path = write_group_spec(tmp_path, GROUP)
    assert path == tmp_path / "teacher.fields.json"
    again = GroupSpec.from_json(path.read_text(), str(path))
    assert again == GROUP and again.fields["teacher_top"] == (np.dtype(np.int16), (2,))


def test_add_shard_fields_failure_leaves_no_temporary_or_partial_file(native_cache: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shard = native_cache / "shard_000001"
    targets = {n: shard / f"{n}.npy" for n in GROUP.fields}  # teacher_logits first, then teacher_top
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        add_shard_fields(targets, teacher_arrays(4, 4))
    monkeypatch.undo()
    assert calls == ["teacher_logits.npy", "teacher_top.npy"]
    assert not targets["teacher_top"].exists()
    assert sorted(p.name for p in shard.iterdir() if p.name.startswith(".")) == []
    np.testing.assert_array_equal(np.load(targets["teacher_logits"]), teacher_arrays(4, 4)["teacher_logits"])
    write_group_spec(native_cache, GROUP)
    report = build_manifest(native_cache)  # the half-written group is incomplete, not in the manifest
    assert [p.shard_id for p in report.incomplete_groups] == [1] and report.problems == []
    with pytest.raises(ValueError, match="name different fields"):
        add_shard_fields(targets, {"teacher_top": np.zeros((4, 2), np.int16)})


def test_remove_stale_temporaries_keeps_live_writers(tmp_path: Path) -> None:
    dead = 2**22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    stale = tmp_path / f".teacher_top.npy.tmp-{dead}-ab12"
    live = tmp_path / f".teacher_top.npy.tmp-{os.getpid()}-cd34"
    other = tmp_path / "teacher_top.npy"
    stale_dir = tmp_path / f".shard_000001.tmp-{dead}-ef56"  # a directory: not this function's business
    for p in (stale, live, other):
        p.write_bytes(b"x")
    stale_dir.mkdir()
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists() and other.exists() and stale_dir.exists()
    assert remove_stale_temporaries(tmp_path) == 0


def test_incremental_rebuild_reuses_group_files(grouped: Path) -> None:
    first = build_manifest(grouped, incremental=False)
    assert first.headers_read == 9 + 4 and first.files_reused == 0
    second = build_manifest(grouped)
    # nothing changed: one file per field is checked against the table, every entry kept
    assert second.headers_read == 5 and second.files_reused == 9 + 4 and second.unchanged
    assert second.manifest.to_json() == first.manifest.to_json()
    fill(grouped, [1])  # the group reaches the last shard: that shard's files are read, plus one file per field
    third = build_manifest(grouped)
    assert third.headers_read == 10 and third.files_reused == 13 and not third.unchanged
    assert third.manifest.positions_with(list(TEACHER)).tolist() == [0, 1, 2]
    assert set(ShardStore.open(grouped).fields) == BASE | TEACHER


def test_field_path_in_both_layouts_and_a_flat_group(tmp_path: Path) -> None:
    native = build_manifest(write_native(tmp_path / "n", 16, 4)).manifest
    assert native.shards[3].field_path("teacher_x") == "shard_000003/teacher_x.npy"
    root = write_flat(tmp_path / "f", 16, 4)
    flat = build_manifest(root).manifest
    assert flat.shards[3].field_path("teacher_x") == "teacher_x_000003.npy"
    assert flat.shards[0].field_path("images") == flat.shards[0].files["images"].path == "images_000000.npy"
    write_group_spec(root, GROUP)
    fill(root, [1, 3])
    assert (root / "teacher_top_000003.npy").exists()
    report = build_manifest(root)
    assert report.problems == [] and report.incomplete_groups == []
    assert report.manifest.shards[3].files["teacher_logits"].path == "teacher_logits_000003.npy"
    store = ShardStore.open(root)
    part = store.subset(store.manifest.positions_with(["teacher_top"]))
    assert part.shard_ids.tolist() == [1, 3] and part.sample(4)["teacher_top"].tolist() == [12, -12]


def test_impossible_pids_in_temporary_names_count_as_dead(tmp_path: Path) -> None:
    (tmp_path / f".x.npy.tmp-{2**31}-ab").write_bytes(b"x")  # os.kill raises OverflowError for it
    assert remove_stale_temporaries(tmp_path) == 1
    assert not list(tmp_path.iterdir())


def test_rewriting_a_group_never_leaves_old_and_new_files_as_a_complete_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_native(tmp_path / "cache", 8, 4)
    write_group_spec(root, GROUP)
    m = fill(root, [0, 1])
    shard = m.shards[0]
    targets = {n: root / shard.field_path(n) for n in GROUP.fields}
    calls = {"n": 0}
    real_replace = os.replace

    def failing_replace(src, dst):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated crash between renames")
        return real_replace(src, dst)

    monkeypatch.setattr("shardstore.store.groups.os.replace", failing_replace)
    new = {n: np.ones_like(a) for n, a in teacher_arrays(shard.num_samples).items()}
    with pytest.raises(OSError, match="simulated"):
        add_shard_fields(targets, new, fsync=False)
    monkeypatch.undo()
    report = build_manifest(root)
    assert not TEACHER <= set(report.manifest.shards[0].files)  # incomplete, so rewritten by its writer
    assert [p.shard_id for p in report.incomplete_groups] == [shard.id]


def test_a_cache_of_group_fields_only_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / "shard_000000").mkdir(parents=True)
    for name, arr in teacher_arrays(4).items():
        np.save(root / "shard_000000" / f"{name}.npy", arr)
    write_group_spec(root, GROUP)
    with pytest.raises(ManifestError, match="only fields of declared groups"):
        build_manifest(root)


# -- safety: a group deletes only its own files, names are identifiers, a full disk is one line --------------


def _tree(path: Path) -> dict[str, bytes]:
    """Every regular file under ``path`` (not following links) with its content."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def test_remove_group_deletes_only_its_regular_files_in_shard_directories(grouped: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    from shardstore.store.groups import remove_group

    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("teacher_logits.npy", "teacher_top.npy", "labels.npy", "teacher_logits_000007.npy"):
        (outside / name).write_bytes(b"keep me")
    before_outside = _tree(outside)
    (grouped / "notes").mkdir()  # an unrelated sub-folder with the same file names
    (grouped / "notes" / "teacher_logits.npy").write_bytes(b"notes")
    (grouped / "notes" / "labels.npy").write_bytes(b"notes")
    (grouped / "linked").symlink_to(outside)  # a link that is not a shard directory
    (grouped / "shard_000099").symlink_to(outside)  # a link named like a shard directory
    (grouped / "teacher_logits_000007.npy").symlink_to(outside / "teacher_logits_000007.npy")  # a flat link
    (grouped / "shard_000001" / "teacher_top.npy").symlink_to(outside / "teacher_top.npy")  # a linked file
    np.save(grouped / "teacher_top_000005.npy", np.zeros((2, 2), np.int16))  # a flat file of the group: its own
    base = {p: p.read_bytes() for p in grouped.glob("shard_00000?/*.npy") if p.stem in BASE}

    with caplog.at_level("WARNING", logger="shardstore.store.groups"):
        removed = remove_group(grouped, "teacher")
    assert removed == 4 + 1  # shards 0 and 2 hold both files; the flat one
    assert _tree(outside) == before_outside
    assert (grouped / "notes" / "teacher_logits.npy").read_bytes() == b"notes"
    assert (grouped / "notes" / "labels.npy").read_bytes() == b"notes"
    assert (grouped / "shard_000001" / "teacher_top.npy").is_symlink()  # left alone, not unlinked either
    assert (grouped / "teacher_logits_000007.npy").is_symlink() and (grouped / "shard_000099").is_symlink()
    assert not list(grouped.glob("shard_00000[02]/teacher_*.npy")) and not (grouped / "teacher_top_000005.npy").exists()
    assert {p: p.read_bytes() for p in grouped.glob("shard_00000?/*.npy") if p.stem in BASE} == base
    assert not (grouped / "teacher.fields.json").exists()
    assert "left alone 3 symbolic link(s)" in caplog.text and "shard_000099" in caplog.text
    assert remove_group(grouped, "teacher") == 0  # no declaration: nothing is known to be the group's


@pytest.mark.parametrize("claimed", ["labels", "teacher_labels"])
def test_a_declaration_naming_a_field_of_the_cache_is_refused_and_nothing_deleted(grouped: Path, claimed: str,
                                                                                  tmp_path: Path) -> None:
    from shardstore.store.groups import remove_group

    build_manifest(grouped)
    if claimed == "teacher_labels":  # a field of the cache that fits the group's prefix
        for shard in sorted(grouped.glob("shard_*")):
            np.save(shard / "teacher_labels.npy", np.load(shard / "labels.npy"))
        build_manifest(grouped)
    declaration = grouped / "teacher.fields.json"
    doc = json.loads(declaration.read_text())
    doc["fields"][claimed] = {"dtype": "<i8", "shape": []}  # the edit
    declaration.write_text(json.dumps(doc))
    before = _tree(grouped)
    if claimed == "labels":
        match = r"field 'labels' of group 'teacher' must be named teacher_<something>"
    else:
        match = (r"teacher\.fields\.json declares 'teacher_labels', which .*manifest\.json lists as a field of the "
                 r"cache itself; a group may declare only the fields it adds: remove 'teacher_labels' from it")
    for attempt in (lambda: remove_group(grouped, "teacher"), lambda: build_manifest(grouped)):
        with pytest.raises(ManifestError, match=match) as exc:
            attempt()
        assert "\n" not in str(exc.value)
    assert _tree(grouped) == before


def test_a_field_of_another_group_in_the_manifest_is_refused(grouped: Path) -> None:
    build_manifest(grouped)
    doc = json.loads((grouped / "manifest.json").read_text())
    doc["fields"]["teacher_top"]["group"] = "older"  # as if another group had written it
    (grouped / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"lists as a field of group 'older'"):
        build_manifest(grouped)


def test_a_huge_or_deeply_nested_declaration_is_one_line(native_cache: Path) -> None:
    declaration = native_cache / "t.fields.json"
    declaration.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match=r"t\.fields\.json: bad field-group declaration"):
        build_manifest(native_cache)
    declaration.write_bytes(b" " * (2 << 20))
    with pytest.raises(ManifestError, match=r"t\.fields\.json: cannot be read \(.*too large for a declaration\)"):
        build_manifest(native_cache)


def test_a_symlinked_declaration_is_not_read(native_cache: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "teacher.fields.json"
    elsewhere.write_text(GROUP.to_json())
    (native_cache / "teacher.fields.json").symlink_to(elsewhere)
    from shardstore.store.groups import read_group_specs

    with pytest.raises(ManifestError, match=r"teacher\.fields\.json is not a regular file \(a symbolic link"):
        read_group_specs(native_cache)


@pytest.mark.parametrize("name", ["../evil", "/abs/olute", "a b", "a\n", "", "9lives", "x" * 65, "a.b", "_x"])
def test_group_names_are_identifiers(tmp_path: Path, name: str) -> None:
    from shardstore.errors import ConfigError
    from shardstore.store.groups import check_group_name, group_file

    for attempt in (lambda: GroupSpec(name, {f"{name}_x": (np.dtype(np.int8), ())}), lambda: group_file(tmp_path, name),
                    lambda: check_group_name(name)):
        with pytest.raises(ConfigError, match=r"group name .* is not allowed; use a letter followed by letters, "
                                              r"digits or underscores \(at most 64 characters\), e\.g\. teacher"):
            attempt()
    assert check_group_name("x" * 64) == "x" * 64 and group_file(tmp_path, "t_2").name == "t_2.fields.json"
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "evil.fields.json").exists()


@pytest.mark.parametrize(
    ("group", "fields", "match"),
    [
        ("../evil", {"x_a": {"dtype": "<i2", "shape": []}}, r"group name '\.\./evil' is not allowed"),
        ("t", {"../t_a": {"dtype": "<i2", "shape": []}}, r"field name '\.\./t_a' is not allowed"),
        ("t", {"t_a\n": {"dtype": "<i2", "shape": []}}, r"field name 't_a\\n' is not allowed"),
        ("t", {"t_" + "a" * 127: {"dtype": "<i2", "shape": []}}, r"at most 128 characters"),
        ("t", {"images": {"dtype": "|u1", "shape": [2]}}, r"field 'images' of group 't' must be named t_<something>"),
        ("t", {"t_a": {"dtype": "|O", "shape": []}}, r"field 't_a' of dtype object is not allowed"),
        ("t", {"t_a": {"dtype": "<i2", "shape": [-5]}}, r"field 't_a' has shape \[-5\]; a shape is a list of sizes"),
        ("t", {"t_a": {"dtype": "<i2", "shape": "12"}}, r"field 't_a' has shape '12'"),
        ("t", {"t_a": {"dtype": "<i2", "shape": [1e400]}}, r"field 't_a' has shape \[inf\]"),
    ],
)
def test_declarations_are_untrusted_input(native_cache: Path, group: str, fields: dict, match: str) -> None:
    doc = {"format": "shardstore-field-group", "version": 1, "group": group, "fields": fields, "meta": {}}
    (native_cache / "t.fields.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=rf"t\.fields\.json: bad field-group declaration \(.*{match}"):
        build_manifest(native_cache)


def test_add_shard_fields_on_a_full_disk_is_one_line_and_leaves_no_temporary(grouped: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from shardstore.errors import DiskFullError

    shard = grouped / "shard_000000"
    targets = {n: shard / f"{n}.npy" for n in GROUP.fields}
    before = _tree(grouped)
    import shardstore.store.groups as groups_module

    real_write = groups_module.write_npy
    calls = []

    def full(f, array):  # the second file finds the disk full halfway
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(f, array)

    monkeypatch.setattr(groups_module, "write_npy", full)
    with pytest.raises(DiskFullError, match=r"no space left on device: writing .*shard_000000/teacher_top\.npy needs "
                                            r"[\d.]+ (bytes|KB).*nothing was replaced") as exc:
        add_shard_fields(targets, {n: a + 1 for n, a in teacher_arrays(4).items()})
    assert "\n" not in str(exc.value) and isinstance(exc.value.__cause__, OSError)
    assert _tree(grouped) == before  # the old files of the group as they were, no temporary left


def test_declaration_temporaries_of_killed_writers_are_removed(native_cache: Path) -> None:
    from shardstore.store.groups import remove_stale_declaration_temporaries

    dead = 2**22 + 12345
    stale = native_cache / f".teacher.fields.json.tmp-{dead}-ab12"
    live = native_cache / f".teacher.fields.json.tmp-{os.getpid()}-cd34"
    unrelated = native_cache / f".notes.txt.tmp-{dead}-ef56"  # not a declaration's: not ours to delete
    for p in (stale, live, unrelated):
        p.write_bytes(b"x")
    assert remove_stale_declaration_temporaries(native_cache) == 1
    assert not stale.exists() and live.exists() and unrelated.exists()
    stale.write_bytes(b"x")
    write_group_spec(native_cache, GROUP)  # writing a declaration clears its own stale temporaries too
    assert not stale.exists() and live.exists()
