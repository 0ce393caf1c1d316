"""The whole loop in one process, for a first look (no web server needed: httpx calls
the app through its ASGI transport).

1. The schema: the store's migrations and the read model's table, through run_sync.
2. Two items added to a new cart; a third with a stale ``expected_version`` answered
   409, as a concurrent writer would meet.
3. The worker catches up (in a thread: it is synchronous), and the read endpoint shows
   the cart.

Run: ``python examples/fastapi_app/demo.py`` (SQLite, ``fastapi_app.db`` here) or with
``DATABASE_URL=postgresql://...``. Serve it for real with
``uvicorn shop:app`` from this folder, and run ``python worker.py --follow`` beside it.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import shop
import worker


async def main() -> None:
    await shop.create_schema()
    cart = f"cart-{uuid.uuid4().hex[:8]}"
    transport = httpx.ASGITransport(app=shop.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        tea = {"sku": "tea", "price_cents": 450, "expected_version": 0}
        added = await client.post(f"/carts/{cart}/items", json=tea)
        print("add tea:", added.status_code, added.json())
        cups = {"sku": "cups", "price_cents": 1200, "expected_version": 1}
        added = await client.post(f"/carts/{cart}/items", json=cups)
        print("add cups:", added.status_code, added.json())
        stale = {"sku": "pot", "price_cents": 3000, "expected_version": 1}
        refused = await client.post(f"/carts/{cart}/items", json=stale)
        print("add pot at a stale version:", refused.status_code, refused.json()["detail"])
        missing = await client.get(f"/carts/{cart}")
        print("read before the worker ran:", missing.status_code)
        handled = await asyncio.to_thread(worker.catch_up)
        print(f"worker handled {handled} events")
        cart_now = await client.get(f"/carts/{cart}")
        print("read:", cart_now.status_code, cart_now.json())
    await shop.engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
