"""Fixtures for the remote tests: one moto S3 server per session, a fault proxy and a fresh bucket per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.remote.s3server import CREDENTIALS, FaultProxy, S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, with the test credentials in the environment for the session."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        with S3Server() as server:
            yield server


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the server, new for each test: no faults, counters at zero, seed 0."""
    with FaultProxy(s3_server.endpoint, seed=0) as proxy:
        yield proxy


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A bucket no other test has used (moto keeps every bucket for the whole session)."""
    return s3_server.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, s3_proxy: FaultProxy) -> dict[str, str]:
    """The standard AWS variables pointed at the proxy, so boto3 and obstore built from the environment reach it.

    ``AWS_ALLOW_HTTP`` is obstore's switch for a plain-HTTP endpoint (boto3 ignores it). Variables that
    would take precedence over these (a profile, a session token, an S3-only endpoint) are removed.
    """
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": s3_proxy.endpoint, "AWS_REGION": CREDENTIALS["AWS_DEFAULT_REGION"],
           "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def read_epochs(loader: Any, epochs: Iterable[int]) -> list[dict[str, np.ndarray]]:
    """Every batch a ``ShardLoader`` yields over ``epochs``, copied out of its ring."""
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [{k: v.numpy().copy() for k, v in b.items()} for b in loader]
    return out


def assert_same(got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]]) -> None:
    """The same non-empty list of batches, field by field."""
    assert len(got) == len(want) and want
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), i
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"batch {i}, field {name}")


def du(path: Path) -> int:
    """What ``du`` counts: allocated blocks of ``path`` and of every file and directory under it."""
    total = os.lstat(path).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total
