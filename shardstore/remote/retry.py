"""Retries for object-store calls: bounded attempts with full-jitter exponential backoff, transient failures only.

Clients never retry by themselves (obstore's own retries are switched off), so this is the one place that
decides how often and how long a request is tried again. Only a ``TransientRemoteError`` (a timeout, a reset
connection, a truncated body, 5xx, 503 SlowDown) and the ``OSError`` kinds that mean the same thing
(``ConnectionError``, ``TimeoutError``) are retried; a missing object, a replaced object or any other error
propagates at once, since trying again cannot change it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shardstore.errors import ConfigError
from shardstore.remote.objects import (
    ObjectChanged,
    ObjectNotFound,
    RemoteError,
    TransientRemoteError,
)

T = TypeVar("T")

#: The ``OSError`` kinds that mean "the network hiccupped", retried like ``TransientRemoteError``. Others
#: (``FileNotFoundError``, ``PermissionError``, a full disk) are not: they would fail the same way again.
TRANSIENT_OS_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a transient failure is tried again, and how long to wait in between.

    Attempt ``k`` (counting from 0) that fails is followed by a sleep drawn uniformly from
    ``[0, min(cap_s, base_s * 2**k)]`` ("full jitter"): many readers that failed together (a 503 SlowDown
    from a busy bucket) spread out instead of coming back in step. The defaults wait at most
    0.1 + 0.2 + ... + 6.4 = 12.7 s in all over 8 attempts.
    """

    attempts: int = 8
    """Attempts in all, the first one included (1 = never retry)."""
    base_s: float = 0.1
    """The largest sleep after the first failure; it doubles after each further failure."""
    cap_s: float = 8.0
    """The largest sleep between two attempts, however many failed."""

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or self.attempts < 1:
            raise ConfigError(f"retry attempts must be a whole number >= 1, got {self.attempts!r}; "
                              f"use 1 to never retry")
        for name in ("base_s", "cap_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"retry {name} must be a number of seconds >= 0, got {value!r}")

    def backoff_s(self, failures: int, rng: random.Random) -> float:
        """The sleep after the ``failures``-th failed attempt (1 = the first)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(failures - 1, 64))
        return rng.uniform(0.0, ceiling)


DEFAULT_POLICY = RetryPolicy()


def _one_line(error: BaseException) -> str:
    """``TypeName: first line of the message`` (a cause quoted in a one-line error must not break it)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def call_with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], object] = time.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """``fn()``, tried again after each transient failure, up to ``policy.attempts`` times in all.

    ``what`` names the request in the final error (``"GET s3://bucket/shard_000001/images.npy [0, 8388608)"``).
    ``on_retry(failures, error)`` is called before each sleep (``failures`` = 1 after the first failed
    attempt), so callers can count retries. ``sleep`` and ``rng`` are there for tests. When every attempt
    failed, a ``RemoteError`` (not transient, so an outer loop does not retry it again) names the request,
    the attempts and the last cause, chained from the last error.
    """
    policy = DEFAULT_POLICY if policy is None else policy
    rng = random.Random() if rng is None else rng
    for failures in range(1, policy.attempts + 1):
        try:
            return fn()
        except (ObjectNotFound, ObjectChanged):
            raise  # never transient, even if a subclass is ever both
        except (TransientRemoteError, *TRANSIENT_OS_ERRORS) as error:
            last = error
        if failures == policy.attempts:
            break
        if on_retry is not None:
            on_retry(failures, last)
        sleep(policy.backoff_s(failures, rng))
    raise RemoteError(f"{what}: failed after {policy.attempts} attempt{'s' if policy.attempts != 1 else ''}; "
                      f"last cause: {_one_line(last)}; check the network and the endpoint, "
                      f"or raise the retry budget (RetryPolicy.attempts)") from last
