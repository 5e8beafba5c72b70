"""A shorter GIL switch interval while loaders run, so their threads are not starved by a busy consumer.

A thread that wants the GIL back (say, a filler whose GIL-free copy just ended) waits until
the holder releases it — or, if the holder is busy in Python, until the interpreter's
switch interval (5 ms by default) forces a switch. A training loop keeps the GIL most of
the time, so each chunk could cost a filler up to two such waits: a loader that copies a
chunk in half a millisecond would spend ten waiting. Lowering the interval to a fraction
of a millisecond while a loader iterates bounds those waits; it costs nothing when no
other thread wants the GIL. Nested loaders share one setting; the previous interval is
restored when the last one ends, unless someone else changed it meanwhile.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_active = 0
_saved: float | None = None
_ours: float | None = None


@contextmanager
def switch_interval(seconds: float | None) -> Iterator[None]:
    """Run the block with the GIL switch interval at most ``seconds`` (None: leave it alone)."""
    global _active, _saved, _ours
    if seconds is None:
        yield
        return
    with _lock:
        if _active == 0:
            _saved = sys.getswitchinterval()
            _ours = min(seconds, _saved)
            sys.setswitchinterval(_ours)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _saved is not None:
                if abs(sys.getswitchinterval() - (_ours or 0.0)) < 1e-9:  # nobody else changed it
                    sys.setswitchinterval(_saved)
                _saved = _ours = None
