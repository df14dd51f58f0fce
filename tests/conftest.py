"""Test-session settings: a private statistics cache, so tests never read or write the user's."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True, scope="session")
def _private_cache() -> object:
    with tempfile.TemporaryDirectory(prefix="deployer-cache-") as d:
        old = os.environ.get("DEPLOYER_CACHE_DIR")
        os.environ["DEPLOYER_CACHE_DIR"] = d
        yield d
        if old is None:
            os.environ.pop("DEPLOYER_CACHE_DIR", None)
        else:
            os.environ["DEPLOYER_CACHE_DIR"] = old
