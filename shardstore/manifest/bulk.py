"""Reading many shards at once: each file's stat and first bytes in one compiled loop, grouped by shared header.

A large cache holds few distinct headers (shards differ in their data, and the last one of a
writer in its row count), so what a header decides -- a field's dtype and per-sample shape,
the size a file must have, equal row counts, a group as declared -- is checked once per
distinct header, and each file costs only its system calls (``open``, ``fstat``, ``pread``,
``close``, made by ``kernels.read_heads`` with the GIL released) and its share of a few NumPy
operations: the headers are compared as rows of one byte array, the sizes against each
header's promise and the value ranges of label-like files computed a block at a time.

A shard with anything odd (a file that cannot be opened, a link, not a regular file, a header
that fails or does not fit the bytes read, a size its header does not promise) goes, with what
was read of it, to the careful per-shard path, which reads again what it needs through the
one inside-the-root check and names the problem. So do all shards when the previous manifest
lends checksums (a file read again may need hashing).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from shardstore.kernels import Heads, read_heads
from shardstore.manifest.discover import Candidate
from shardstore.manifest.scan import FileStat, Scan, _Parsed

#: bytes of each file read in the compiled loop: any header ``np.save`` writes for a cache's dtypes (128 or 192
#: bytes) and the labels of a small shard. A longer header is read again by the careful path; labels beyond it
#: are read in a second pass, one file per label-like header at a time.
HEAD_WIDTH = 256
#: files per compiled call (a batch's heads take 4 MiB; see ``Reader.AHEAD``)
CHUNK_FILES = 16384
#: bytes of labels per compiled call of the second pass
LABEL_CHUNK_BYTES = 64 << 20
_NPY_V1 = np.frombuffer(b"\x93NUMPY\x01\x00", np.uint8)

#: what a careful read of a shard is given: per field, the file's stat and first bytes, if read already
Preread = dict[str, "tuple[FileStat, bytes] | None"]


class Signature:
    """Shards whose files have the same names and headers, in one layout and id width."""

    __slots__ = ("_ranges", "cands", "digits", "layout", "mtimes", "names", "parsed")

    def __init__(self, layout: str, digits: int, names: tuple[str, ...], parsed: tuple[_Parsed, ...]) -> None:
        self.layout = layout
        self.digits = digits
        self.names = names
        self.parsed = parsed
        self.cands: list[Candidate] = []
        #: the mtime of each shard's file, per name
        self.mtimes: list[list[int]] = [[] for _ in names]
        # per name, blocks of (low, high) per shard of a label-like file (None: its range is not recorded)
        self._ranges: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in names]

    def add(self, cands: list[Candidate], mtimes: list[list[int]],
            ranges: list[tuple[np.ndarray, np.ndarray] | None]) -> None:
        """Shards of this signature: their candidates, the mtime of each file, the value ranges of label-like ones."""
        self.cands += cands
        for i in range(len(self.names)):
            self.mtimes[i] += mtimes[i]
            if ranges[i] is not None:
                self._ranges[i].append(ranges[i])

    def absorb(self, other: Signature) -> None:
        """Add the shards of ``other`` (same key, read by a later pass)."""
        self.cands += other.cands
        for i in range(len(self.names)):
            self.mtimes[i] += other.mtimes[i]
            self._ranges[i] += other._ranges[i]

    def value_ranges(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(min, max) per shard of the ``i``-th file if label-like (None if not; (1, 0) for a uint64 beyond int64)."""
        blocks = self._ranges[i]
        if not blocks:
            return None
        return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def digits_of(cand: Candidate) -> int:
    """Width of the id in a shard's name (``shard_000042`` is 6, ``images_42.npy`` is 2)."""
    name = cand.where if cand.layout == "native" else cand.where[: -len(".npy")]
    return len(name) - name.rindex("_") - 1


class _Headers(NamedTuple):
    """The distinct headers of the files read: per file its header's index (-1: none whole), per header its content."""

    index: np.ndarray
    parsed: list[_Parsed | None]  # None: not a header a shard can pass with
    file_bytes: np.ndarray  # -1: a header no shard passes with
    label_end: np.ndarray  # 0: no labels to record


def _distinct_headers(scan: Scan, h: Heads) -> _Headers:
    """Group the files by their header bytes (NumPy over the rows read) and parse each distinct header once."""
    n = len(h)
    index = np.full(n, -1, np.int64)
    heads = h.heads
    ok = h.regular() & (h.read >= 10) & (heads[:, :8] == _NPY_V1).all(axis=1)
    ends = 10 + (heads[:, 8].astype(np.int64) | heads[:, 9].astype(np.int64) << 8)
    ok &= ends <= h.read  # the whole header was read (a longer one is read again by the careful path)
    rows = np.flatnonzero(ok)
    if not rows.size:
        return _Headers(index, [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    ends = ends[rows]
    width = -(-int(ends.max()) // 8) * 8  # compared as 8-byte words (HEAD_WIDTH is a multiple of 8)
    keys = heads[:, :width] if rows.size == n else heads[rows, :width]
    if int(ends.min()) < width:  # the bytes after a header (its data) are not part of it
        keys = np.where(np.arange(width) < ends[:, None], keys, np.uint8(0))
    words = keys.view(np.uint64)
    # A cache holds a few distinct headers: each is found by comparing every row left with the first one left;
    # past a few, the rest are sorted (equal rows end up next to each other, and only rows found equal are grouped).
    firsts: list[int] = []
    left = np.arange(rows.size)
    while left.size and len(firsts) < 8:
        same = (words[left] == words[left[0]]).all(axis=1) if len(firsts) else (words == words[0]).all(axis=1)
        index[rows[left[same]]] = len(firsts)
        firsts.append(int(left[0]))
        left = left[~same]
    if left.size:
        order = left[np.argsort(np.ascontiguousarray(keys[left]).view(f"V{width}").ravel(), kind="stable")]
        ordered = words[order]
        new = np.ones(order.size, bool)
        new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
        index[rows[order]] = len(firsts) + np.cumsum(new) - 1
        firsts += order[new].tolist()
    parsed: list[_Parsed | None] = []
    for k in firsts:
        p = scan.parsed(keys[k, : ends[k]].tobytes())
        parsed.append(p if isinstance(p, _Parsed) and p.problem is None else None)
    file_bytes = np.array([p.file_bytes if p is not None else -1 for p in parsed], np.int64)
    label_end = np.array([p.label_slice[1] if p is not None else 0 for p in parsed], np.int64)
    return _Headers(index, parsed, file_bytes, label_end)


def _ranges_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of each row of label values, as int64; (1, 0) where a uint64 lies beyond int64."""
    low, high = values.min(axis=1), values.max(axis=1)
    if values.dtype.kind == "u" and values.dtype.itemsize == 8:
        fits = high < 2**63
        low, high = low.astype(np.int64), high.astype(np.int64)
        low[~fits], high[~fits] = 1, 0  # not recorded
    return low.astype(np.int64), high.astype(np.int64)


class _Block:
    """The files of shards with the same layout and names, read: per file its stat, bytes and header."""

    def __init__(self, scan: Scan, cands: list[Candidate], names: tuple[str, ...], paths: list[bytes],
                 h: Heads) -> None:
        self.cands = cands
        self.names = names
        self.paths = paths
        self.h = h
        self.headers = hd = _distinct_headers(scan, h)
        g = hd.index
        if len(hd.parsed):
            gi = np.maximum(g, 0)
            fits = (g >= 0) & (hd.file_bytes[gi] >= 0) & (h.size == hd.file_bytes[gi])
        else:
            fits = np.zeros(len(g), bool)
        #: per file: passes every per-file check
        self.fast = fits
        #: per file with labels to record: their (low, high) (only where ``fast``)
        self.low = np.zeros(len(g), np.int64)
        self.high = np.zeros(len(g), np.int64)
        if scan.lend is None and len(hd.parsed):  # (with a lender every shard takes the careful path)
            self._label_ranges(scan, np.flatnonzero(fits & (hd.label_end[gi] > 0)))

    def _label_ranges(self, scan: Scan, labelled: np.ndarray) -> None:
        hd = self.headers
        h = self.h
        for gid in np.unique(hd.index[labelled]).tolist():
            files = labelled[hd.index[labelled] == gid]
            parsed = hd.parsed[gid]
            assert parsed is not None
            start, end = parsed.label_slice
            dtype = parsed.header.dtype
            inside = files[h.read[files] >= end]  # in the bytes read already
            if inside.size:
                values = np.ascontiguousarray(h.heads[inside, start:end]).view(dtype)
                self.low[inside], self.high[inside] = _ranges_of(values)
            beyond = files[h.read[files] < end]
            step = max(1, LABEL_CHUNK_BYTES // (end - start))
            for k in range(0, beyond.size, step):
                part = beyond[k:k + step]
                again = read_heads(scan.root_fd, [self.paths[i] for i in part.tolist()], end - start, start)
                same = (again.regular() & (again.read == end - start) & (again.size == h.size[part])
                        & (again.mtime_ns == h.mtime_ns[part]) & (again.ino == h.ino[part]))
                self.fast[part[~same]] = False  # changed between the two reads: the careful path reads it again
                if same.any():
                    values = np.ascontiguousarray(again.heads[same]).view(dtype)
                    self.low[part[same]], self.high[part[same]] = _ranges_of(values)

    def preread(self, i: int) -> tuple[FileStat, bytes] | None:
        """What the careful path is given of file ``i``: its stat and bytes, if they hold its whole header."""
        h = self.h
        if not (h.errno[i] == 0 and h.mode[i] & 0o170000 == 0o100000):
            return None
        if self.headers.index[i] < 0 and h.read[i] != h.size[i]:
            return None  # a header longer than the bytes read, or not .npy: read again as a whole
        return FileStat(int(h.size[i]), int(h.mtime_ns[i]), int(h.mode[i])), h.heads[i, : h.read[i]].tobytes()


def _paths(cands: list[Candidate], names: tuple[str, ...]) -> list[bytes]:
    """Each candidate's files in ``names`` order, as the bytes the file system sees."""
    if not cands or not names:
        return []
    if all(c.names is not None for c in cands):  # native shards found whole: <where>/<name>.npy, a name at a time
        wheres = [c.where for c in cands]
        paths: list[bytes] = [b""] * (len(cands) * len(names))
        for i, n in enumerate(names):
            suffix = f"/{n}.npy"
            text = f"{suffix}\0".join(wheres) + suffix
            paths[i::len(names)] = text.encode("utf-8", "surrogateescape").split(b"\0")
        return paths
    text = "\0".join([c.files[n] for c in cands for n in names])
    return text.encode("utf-8", "surrogateescape").split(b"\0")


class _Batch(NamedTuple):
    layout: str
    names: tuple[str, ...]
    cands: list[Candidate]
    paths: list[bytes]
    heads: Future[Heads]


class Reader:
    """Reads shards in batches on one worker thread while the build goes on, and sorts them into signatures.

    The compiled loop holds no GIL, so its system calls overlap the Python work of the build:
    discovery hands over the shards it finds whole (``add``) while it looks at the rest of the
    root, and each batch read is checked and sorted while the next ones are read. At most
    ``AHEAD`` batches wait to be sorted (4 MiB of heads each), so a root of 10^6 shards needs
    about 20 MiB for this, not the heads of every file (0.5 GiB). Shards whose id is in
    ``skip`` (read by an earlier pass of the build) are not read again.
    """

    #: batches read ahead of the one being sorted
    AHEAD = 4

    def __init__(self, scan: Scan, group_fields: set[str], careful: Callable[[Candidate, Preread], None],
                 skip: set[int] | None = None) -> None:
        self.scan = scan
        self.group_fields = group_fields
        self.careful = careful
        self.skip = skip
        #: the shards sorted so far, by signature
        self.signatures: dict[tuple, Signature] = {}
        self._batches: deque[_Batch] = deque()
        self._added: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The reading thread (discovery ``lstat``-s the directories for the journal on it too)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shardstore-read")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._batches.clear()

    def add(self, cands: list[Candidate]) -> None:
        """Start reading ``cands`` (in batches of at most ``CHUNK_FILES`` files of shards with the same names)."""
        if self.skip:
            cands = [c for c in cands if c.id not in self.skip]
        self._added.update(map(attrgetter("id"), cands))
        self._start(cands)

    def finish(self, cands: list[Candidate]) -> dict[tuple, Signature]:
        """Read those of ``cands`` not given to ``add``, sort every batch, and return the signatures."""
        if len(cands) != len(self._added):
            self._start([c for c in cands if c.id not in self._added])
        while self._batches:
            self._sort_next()
        return {key: sig for key, sig in self.signatures.items() if sig.cands}

    def _start(self, cands: list[Candidate]) -> None:
        if not cands:
            return
        first = cands[0].names
        by_names: dict[tuple[str, tuple[str, ...]], list[Candidate]] = {}
        if first is not None and list(map(attrgetter("names"), cands)).count(first) == len(cands):
            by_names[(cands[0].layout, first)] = cands  # the usual: a batch of directories the journal vouches for
        else:
            order: dict[tuple[str, ...], tuple[str, ...]] = {}
            for cand in cands:
                names = cand.names
                if names is None:
                    keys = tuple(cand.files)
                    names = order.get(keys)
                    if names is None:
                        names = order[keys] = tuple(sorted(cand.files))
                by_names.setdefault((cand.layout, names), []).append(cand)
        for (layout, names), group in by_names.items():
            step = max(1, CHUNK_FILES // max(len(names), 1))
            for s in range(0, len(group), step):
                part = group[s:s + step]
                paths = _paths(part, names)
                future = self.pool.submit(read_heads, self.scan.root_fd, paths, HEAD_WIDTH)
                self._batches.append(_Batch(layout, names, part, paths, future))
                while len(self._batches) > self.AHEAD:
                    self._sort_next()

    def _sort_next(self) -> None:
        b = self._batches.popleft()
        block = _Block(self.scan, b.cands, b.names, b.paths, b.heads.result())
        _sort(self.scan, block, b.layout, self.group_fields, self.careful, self.signatures)


def _sort(scan: Scan, block: _Block, layout: str, group_fields: set[str],
          careful: Callable[[Candidate, Preread], None], sigs: dict[tuple, Signature]) -> None:
    """Put each shard of ``block`` into its signature, or give it to ``careful``."""
    cands, names, h = block.cands, block.names, block.h
    k = len(names)
    n = len(cands)
    fast = block.fast.reshape(n, k).all(axis=1) if k else np.zeros(n, bool)
    if scan.lend is not None:
        fast[:] = False
    if layout == "native":
        digits = np.fromiter(map(len, map(attrgetter("where"), cands)), np.int64, n) - len("shard_")
    else:
        digits = np.fromiter((digits_of(c) for c in cands), np.int64, n)
        widths = [(len(c.files[m]) - len(m) - len("_.npy") for m in names) for c in cands]
        fast &= np.fromiter((all(w == d for w in ws) for ws, d in zip(widths, digits.tolist())), bool, n)
    rows = np.flatnonzero(fast)
    to_careful = np.flatnonzero(~fast).tolist()
    if rows.size:
        keys = np.concatenate([digits[rows, None], block.headers.index.reshape(n, k)[rows]], axis=1)
        if (keys == keys[0]).all():  # the usual: one signature
            distinct, members_of = keys[:1], [rows]
        else:
            by_key = np.lexsort(keys.T[::-1])
            ordered = keys[by_key]
            new = np.ones(len(rows), bool)
            new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
            starts = np.flatnonzero(new)
            distinct = ordered[starts]
            members_of = np.split(rows[by_key], starts[1:])
        parsed_of = block.headers.parsed
        mtimes = h.mtime_ns.reshape(n, k)
        low, high = block.low.reshape(n, k), block.high.reshape(n, k)
        whole = len(members_of) == 1 and rows.size == n  # every shard of the block, in one signature
        for key_row, members in zip(distinct.tolist(), members_of):
            parsed = tuple(parsed_of[g] for g in key_row[1:])
            key = (layout, key_row[0], names, *parsed)
            sig = sigs.get(key)
            if sig is None:
                sig = sigs[key] = Signature(layout, key_row[0], names, parsed)  # type: ignore[arg-type]
            own_rows = {p.header.shape[0] for m, p in zip(names, parsed) if m not in group_fields}  # type: ignore[union-attr]
            if len(own_rows) > 1:  # fields of unequal length: named shard by shard
                to_careful += members.tolist()
                continue
            ranges = [(low[members, i], high[members, i]) if p.label_slice[1] else None  # type: ignore[union-attr]
                      for i, p in enumerate(parsed)]
            sig.add(cands if whole else [cands[j] for j in members.tolist()],
                    [(mtimes[:, i] if whole else mtimes[members, i]).tolist() for i in range(k)], ranges)
    read = int(block.fast.sum())
    for j in sorted(to_careful):
        pre: Preread = {}
        for i, m in enumerate(names):
            got = block.preread(j * k + i)
            pre[m] = got
            if got is not None and not block.fast[j * k + i]:
                read += 1
        careful(cands[j], pre)
    scan.headers_read += read
