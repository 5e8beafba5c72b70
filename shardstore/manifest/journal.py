"""Reading the writers' journal (``ROOT/.shardstore-journal``): the files each native shard had when it was finished.

The journal is advice that saves listing a shard directory (four system calls, as many as
reading two headers): a shard's files are taken from its line only while the directory is
the one recorded, with the recorded mtime (one ``stat``; adding, removing or renaming a file
in a directory changes its mtime). Anything the journal cannot vouch for is listed as usual:
a directory without a line, replaced or changed since, or whose line is torn (a writer
killed mid-line) or malformed. Timestamps are as fine as the file system's clock: a file
added to a directory within the same clock tick as its writer's rename would go unseen
until a full build.
"""

from __future__ import annotations

import logging
import os
import stat

from shardstore.store.layout import FIELD_NAME
from shardstore.store.writer import JOURNAL_NAME

log = logging.getLogger(__name__)

#: a journal beyond this is not read (about 10^7 shards' lines); the shards are listed instead
MAX_JOURNAL_BYTES = 512 << 20


class Journal:
    """The last line of each shard directory, parsed only when a build asks for that directory."""

    def __init__(self, data: bytes = b"") -> None:
        # The last piece after the final newline is a line still being written, or torn: never used.
        lines = data.split(b"\n")[:-1]
        self._lines: dict[bytes, bytes] = {}
        for line in lines:
            name, _, rest = line.partition(b" ")
            self._lines[name] = rest  # a later line (a shard written again) wins
        self._names: dict[bytes, list[str]] = {}

    def __len__(self) -> int:
        return len(self._lines)

    def fields(self, dir_name: str, inode: int, mtime_ns: int) -> tuple[tuple[str, str], ...] | None:
        """``(field, path)`` of each file recorded for ``dir_name`` if its line is well-formed and names this inode
        and mtime, else None."""
        rest = self._lines.get(dir_name.encode())
        if rest is None:
            return None
        stamp = b"%d %d " % (inode, mtime_ns)
        if not rest.startswith(stamp):
            return None
        names = self._names.get(rest[len(stamp):])
        if names is None:  # shards of one writer share their names: each distinct list is checked once
            names = self._names[rest[len(stamp):]] = _field_names(rest[len(stamp):])
        return tuple((n, f"{dir_name}/{n}.npy") for n in names) if names else None


def _field_names(text: bytes) -> list[str]:
    """The field names of a line ([] if any is not a field name, or one is repeated)."""
    try:
        names = text.decode("ascii").split(" ")
    except UnicodeDecodeError:
        return []
    if not all(FIELD_NAME.match(n) for n in names) or len(set(names)) != len(names):
        return []
    return names


#: bytes of journal one directory listing is worth: listing costs about 20 us, parsing 2 KB of lines about as much
BYTES_PER_LISTING = 2048


def read_journal(root_fd: int, num_dirs: int) -> Journal:
    """The journal of the cache open as ``root_fd``, when it is cheaper than listing ``num_dirs`` directories.

    Empty when there is none, it is odd, or parsing it would cost more than the listings it
    saves (a few new shards of a large cache). Read without following a link and only as a
    regular file: a cache may come from someone else.
    """
    try:
        fd = os.open(JOURNAL_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        return Journal()
    except OSError as exc:
        log.warning("%s cannot be read (%s); shard directories are listed instead", JOURNAL_NAME, exc.strerror or exc)
        return Journal()
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size > num_dirs * BYTES_PER_LISTING:
            return Journal()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_JOURNAL_BYTES:
            log.warning("%s is not a regular file of at most %d MiB; shard directories are listed instead",
                        JOURNAL_NAME, MAX_JOURNAL_BYTES >> 20)
            return Journal()
        chunks = []
        offset = 0
        while chunk := os.pread(fd, min(st.st_size - offset, 16 << 20) or 1, offset):
            chunks.append(chunk)
            offset += len(chunk)
            if offset >= st.st_size:
                break
        return Journal(b"".join(chunks))
    except OSError as exc:
        log.warning("%s cannot be read (%s); shard directories are listed instead", JOURNAL_NAME, exc.strerror or exc)
        return Journal()
    finally:
        os.close(fd)
