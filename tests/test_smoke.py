"""The README's quick start, through the shipped pytest plugin on both databases."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.testing import RunProjections


class Titles(es.Projection):
    name = "titles"
    aggregate_types = ("Book",)

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(
            sa.text("INSERT INTO titles (id, title) VALUES (:id, :title)"),
            {"id": event.aggregate_id, "title": event.payload["title"]},
        )


def test_quick_start(
    eventsource_session: Session, event_store: es.EventStore, run_projections: RunProjections
) -> None:
    session = eventsource_session
    session.execute(sa.text("CREATE TABLE titles (id TEXT PRIMARY KEY, title TEXT NOT NULL)"))
    added = es.Event(
        bounded_context="library",
        aggregate_type="Book",
        aggregate_id="b-1",
        event_type="BookAdded",
        payload={"title": "Dune"},
    )
    result = event_store.append(
        session,
        [added],
        es.ExpectedVersion.no_stream(),
    )
    assert result.to_version == 1
    session.commit()  # only releases the fixture's savepoint

    stream = event_store.read_stream(session, "library", "Book", "b-1")
    assert [e.payload for e in stream] == [{"title": "Dune"}]

    handled = run_projections(Titles())
    assert [e.event_type for e in handled["titles"]] == ["BookAdded"]
    assert session.execute(sa.text("SELECT title FROM titles")).scalars().all() == ["Dune"]
