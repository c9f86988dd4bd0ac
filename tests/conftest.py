"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from tests.peers import ScrapeTarget

# ---- end-to-end tests with real peers (tests/peers.py) ----------------------------------------


@pytest.fixture
async def peer_client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for talking to peers and to governor; bounded per request."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


@pytest.fixture
async def scrape_target(nursery: trio.Nursery) -> ScrapeTarget:
    """A scrape target serving tests.peers.TARGET_SERIES on 127.0.0.1, until the test ends."""
    target = ScrapeTarget()
    await nursery.start(target.serve)
    return target
