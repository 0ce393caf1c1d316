"""A small FastAPI service on eventsource: carts whose items are events.

- ``POST /carts/{cart_id}/items`` appends an ``ItemAdded`` event through
  :class:`eventsource.AsyncEventStore`, in the request's transaction. With
  ``expected_version`` it is an optimistic-concurrency check: another writer got there
  first answers HTTP 409.
- ``GET /carts/{cart_id}`` reads the ``cart_totals`` read model, which the
  ``CartTotals`` projection keeps in step with the events. The projection runs in a
  worker (``worker.py``, or ``eventsource run shop:PROJECTIONS``), not in the web
  process.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import eventsource as es

DEFAULT_URL = "sqlite:///fastapi_app.db"

metadata = sa.MetaData()
cart_totals = sa.Table(
    "cart_totals",
    metadata,
    sa.Column("cart_id", sa.Text, primary_key=True),
    sa.Column("item_count", sa.Integer, nullable=False),
    sa.Column("total_cents", sa.BigInteger, nullable=False),
)


class CartTotals(es.Projection):
    """Items and total per cart: the read model the GET endpoint serves."""

    name = "fastapi_cart_totals"
    aggregate_types = ("Cart",)

    def handle(self, event: es.PersistedEvent, session: sa.orm.Session) -> None:
        if event.event_type != "ItemAdded":
            return
        price = int(event.payload["price_cents"])
        session.execute(
            upsert(cart_totals, session)
            .values(cart_id=event.aggregate_id, item_count=1, total_cents=price)
            .on_conflict_do_update(
                index_elements=[cart_totals.c.cart_id],
                set_={
                    "item_count": cart_totals.c.item_count + 1,
                    "total_cents": cart_totals.c.total_cents + price,
                },
            )
        )


def upsert(table: sa.Table, session: sa.orm.Session) -> Any:
    """INSERT ... ON CONFLICT, as the session's database writes it."""
    from sqlalchemy.dialects import postgresql, sqlite

    postgres = session.get_bind().dialect.name == "postgresql"
    return (postgresql.insert if postgres else sqlite.insert)(table)


#: What the worker runs (``eventsource run shop:PROJECTIONS``).
PROJECTIONS = [CartTotals()]


def database_url() -> str:
    return os.environ.get("DATABASE_URL", DEFAULT_URL)


engine = es.create_async_engine(database_url())
sessions = async_sessionmaker(engine, expire_on_commit=False)
store = es.AsyncEventStore()
app = FastAPI(title="carts")


async def get_session() -> AsyncIterator[AsyncSession]:
    """One session per request; the endpoint commits what it wants kept."""
    async with sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


class NewItem(BaseModel):
    sku: str = Field(min_length=1)
    price_cents: int = Field(ge=0)
    expected_version: int | None = Field(default=None, ge=0)


@app.post("/carts/{cart_id}/items")
async def add_item(cart_id: str, item: NewItem, session: SessionDep) -> dict[str, int]:
    event = es.Event(
        bounded_context="shop",
        aggregate_type="Cart",
        aggregate_id=cart_id,
        event_type="ItemAdded",
        payload={"sku": item.sku, "price_cents": item.price_cents},
    )
    expected = (
        es.ExpectedVersion.any()
        if item.expected_version is None
        else es.ExpectedVersion.exact(item.expected_version)
    )
    try:
        result = await store.append(session, [event], expected)
        await session.commit()
    except es.OptimisticConcurrencyError as exc:
        await session.rollback()
        detail = {"error": "version conflict", "expected": item.expected_version}
        raise HTTPException(status_code=409, detail={**detail, "actual": exc.actual}) from exc
    except es.ValidationError as exc:
        await session.rollback()
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return {"version": result.to_version, "position": result.events[-1].global_position}


@app.get("/carts/{cart_id}")
async def read_cart(cart_id: str, session: SessionDep) -> dict[str, int]:
    row = (
        await session.execute(sa.select(cart_totals).where(cart_totals.c.cart_id == cart_id))
    ).one_or_none()
    if row is None:
        raise HTTPException(status_code=404, detail=f"no cart {cart_id} (yet)")
    return {"items": row.item_count, "total_cents": row.total_cents}


async def create_schema() -> None:
    """The store's tables (its migrations) and the read model's, through run_sync."""
    async with engine.begin() as conn:
        await conn.run_sync(es.upgrade)
        await conn.run_sync(metadata.create_all)
