"""The service's tests, with eventsource's async fixtures: every test runs in a
transaction rolled back afterwards, on SQLite or on PostgreSQL
(``--eventsource-db-url``). Run from this folder: ``pytest``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import shop
from sqlalchemy.ext.asyncio import AsyncSession

from eventsource.testing import AsyncRunProjections

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(eventsource_async_session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """The app, its requests in the test's transaction (commits become savepoints)."""

    async def test_session() -> AsyncIterator[AsyncSession]:
        yield eventsource_async_session

    shop.app.dependency_overrides[shop.get_session] = test_session
    transport = httpx.ASGITransport(app=shop.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            yield client
    finally:
        shop.app.dependency_overrides.clear()


async def test_items_append_events_and_a_stale_version_is_a_conflict(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post("/carts/c1/items", json={"sku": "tea", "price_cents": 450})
    assert first.status_code == 200
    assert first.json()["version"] == 1
    stale = await client.post(
        "/carts/c1/items", json={"sku": "pot", "price_cents": 3000, "expected_version": 0}
    )
    assert stale.status_code == 409
    assert stale.json()["detail"] == {"error": "version conflict", "expected": 0, "actual": 1}
    right = await client.post(
        "/carts/c1/items", json={"sku": "pot", "price_cents": 3000, "expected_version": 1}
    )
    assert right.json()["version"] == 2


async def test_the_read_model_follows_the_events(
    client: httpx.AsyncClient, async_run_projections: AsyncRunProjections
) -> None:
    assert (await client.get("/carts/c1")).status_code == 404
    for price in (450, 1200):
        await client.post("/carts/c1/items", json={"sku": "x", "price_cents": price})
    handled = await async_run_projections(shop.CartTotals())
    assert len(handled["fastapi_cart_totals"]) == 2
    cart = await client.get("/carts/c1")
    assert cart.json() == {"items": 2, "total_cents": 1650}


async def test_each_test_starts_empty(client: httpx.AsyncClient) -> None:
    first = await client.post("/carts/c1/items", json={"sku": "tea", "price_cents": 450})
    assert first.json()["version"] == 1  # the other tests' carts were rolled back
