"""Reading many shards in one loop, grouped by signature: the field names and headers their files share.

A large cache holds few distinct headers (shards differ in their data, and the last one of a
writer in its row count), so what a header decides -- a field's dtype and per-sample shape,
equal row counts, a group as declared -- is checked once per signature, and each shard costs
its system calls (``open``, ``fstat``, ``pread``, ``close`` per file) and a few list appends.
A shard with anything odd (a file that cannot be opened or is not a regular file, a header
that fails, a size its header does not promise) goes, with what was read of it, to the
careful per-shard path, which names the problem. So do all shards when the previous
manifest lends checksums (a file read again may need hashing).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import numpy as np

from shardstore.manifest.discover import Candidate
from shardstore.manifest.scan import _OPEN_FLAGS, Scan, read_head
from shardstore.store.npy import HEAD_BYTES

#: what a careful read of a shard is given: per field, the file's stat and first bytes, if read already
Preread = dict[str, "tuple[os.stat_result, bytes] | None"]


class Signature:
    """Shards whose files have the same names and headers, in one layout and id width."""

    __slots__ = ("cands", "digits", "labels", "layout", "mtimes", "names", "parsed")

    def __init__(self, layout: str, digits: int, names: tuple[str, ...], parsed: tuple) -> None:
        self.layout = layout
        self.digits = digits
        self.names = names
        self.parsed = parsed  # scan._Parsed per name
        self.cands: list[Candidate] = []
        self.mtimes: list[list[int]] = [[] for _ in names]
        #: the labels of each label-like file, as read with its header
        self.labels: list[list[bytes]] = [[] for _ in names]

    @property
    def rows(self) -> dict[str, int]:
        """Row count of each file."""
        return {n: p.header.shape[0] for n, p in zip(self.names, self.parsed)}

    def value_ranges(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(min, max) per shard of the ``i``-th file if it is label-like (None if not, or a uint64 beyond int64)."""
        chunks = self.labels[i]
        if not chunks:
            return None
        dtype = self.parsed[i].header.dtype
        values = np.frombuffer(b"".join(chunks), dtype).reshape(len(chunks), -1)
        low, high = values.min(axis=1), values.max(axis=1)
        if dtype.kind == "u" and dtype.itemsize == 8:
            fits = high < 2**63
            low, high = low.astype(np.int64), high.astype(np.int64)
            low[~fits], high[~fits] = 1, 0  # not recorded
        return low.astype(np.int64), high.astype(np.int64)


def digits_of(cand: Candidate) -> int:
    """Width of the id in a shard's name (``shard_000042`` is 6, ``images_42.npy`` is 2)."""
    name = cand.where if cand.layout == "native" else cand.where[: -len(".npy")]
    return len(name) - name.rindex("_") - 1


def read_bulk(scan: Scan, cands: Iterable[Candidate], group_fields: set[str],
              careful: Callable[[Candidate, Preread], None]) -> dict[tuple, Signature]:
    """Read every candidate; shards passing the per-file checks are grouped by signature, the others go to ``careful``.

    A signature whose own files differ in row count, or a flat shard whose files write its id
    in two widths, goes to ``careful`` as well (it names them shard by shard).
    """
    sigs: dict[tuple, Signature] = {}
    consistent: dict[tuple, bool] = {}
    order: dict[tuple, tuple[str, ...]] = {}
    headers = scan._headers
    root_fd = scan.root_fd
    open_, fstat, pread, close = os.open, os.fstat, os.pread, os.close
    read = 0
    for cand in cands:
        files = cand.files
        names = order.get(tuple(files))
        if names is None:
            names = order[tuple(files)] = tuple(sorted(files))
        got: list = []
        fast = True
        for name in names:
            try:
                fd = open_(files[name], _OPEN_FLAGS, dir_fd=root_fd)
            except OSError:  # gone, a link, unreadable: the careful path says which
                fast = False
                got.append(None)
                continue
            try:
                st = fstat(fd)
                if st.st_mode & 0o170000 != 0o100000:  # not a regular file (a FIFO, a device): never read
                    fast = False
                    got.append(None)
                    continue
                head = pread(fd, HEAD_BYTES, 0)
                if len(head) == HEAD_BYTES and HEAD_BYTES < st.st_size:
                    head = read_head(fd, st.st_size)
            except OSError:
                fast = False
                got.append(None)
                continue
            finally:
                close(fd)
            read += 1
            parsed = (headers.get(head[: 10 + (head[8] | head[9] << 8)])
                      if head[6:8] == b"\x01\x00" and len(head) > 9 else None)
            if parsed is None:
                parsed = scan.parsed(head)
                if isinstance(parsed, str):
                    fast = False
            if fast and (parsed.problem is not None or st.st_size != parsed.file_bytes
                         or parsed.label_slice[1] > len(head)):  # labels beyond the page: read by the careful path
                fast = False
            got.append((st, head, parsed))
        if fast and scan.lend is None:
            digits = digits_of(cand)
            if cand.layout == "flat" and any(len(files[n]) - len(n) - 5 != digits for n in names):
                fast = False  # its files write its id in two widths
        if fast and scan.lend is None:
            key = (cand.layout, digits, names, *(g[2] for g in got))
            sig = sigs.get(key)
            if sig is None:
                sig = Signature(key[0], key[1], names, key[3:])
                own_rows = {p.header.shape[0] for n, p in zip(names, sig.parsed) if n not in group_fields}
                consistent[key] = len(own_rows) <= 1
                sigs[key] = sig
            if consistent[key]:
                sig.cands.append(cand)
                for i, (st, head, parsed) in enumerate(got):
                    sig.mtimes[i].append(st.st_mtime_ns)
                    start, end = parsed.label_slice
                    if end:
                        sig.labels[i].append(head[start:end])
                continue
        careful(cand, {n: (g[0], g[1]) if g is not None else None for n, g in zip(names, got)})
    scan.headers_read += read
    return {k: s for k, s in sigs.items() if s.cands}
