"""The pytest plugin, exercised the way users meet it: in a separate pytest run."""

from __future__ import annotations

import pytest

from tests.conftest import PostgresServer

pytest_plugins = ["pytester"]

PROJECT = """
from __future__ import annotations

import factory
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.testing.factories import EventFactory


class UserPayload(factory.DictFactory):
    name = factory.Faker("name")


class UserCreatedFactory(EventFactory):
    bounded_context = "shop"
    aggregate_type = "User"
    event_type = "UserCreated"
    payload = factory.SubFactory(UserPayload)


class UserNames(es.Projection):
    name = "user_names"
    aggregate_types = ("User",)

    def handle(self, event, session):
        session.execute(
            sa.text("INSERT INTO user_names (id, name) VALUES (:id, :name)"),
            {"id": event.aggregate_id, "name": event.payload["name"]},
        )


class Exploding(es.Projection):
    name = "exploding"

    def handle(self, event, session):
        raise LookupError(f"no handler for {event.event_type}")


@pytest.fixture
def read_model(eventsource_session):
    eventsource_session.execute(
        sa.text("CREATE TABLE user_names (id TEXT PRIMARY KEY, name TEXT NOT NULL)")
    )


def count(session, table):
    return session.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
"""

TESTS = """
from __future__ import annotations

import pytest
import sqlalchemy as sa

import eventsource as es
from helpers import *


@pytest.mark.parametrize("round", [1, 2])
def test_commit_leaves_nothing_behind(eventsource_session, event_store, round):
    assert count(eventsource_session, "events") == 0
    assert count(eventsource_session, "projection_checkpoints") == 0
    event_store.append(eventsource_session, [es.Event(
        bounded_context="shop", aggregate_type="User", aggregate_id="same-id",
        event_type="UserCreated", payload={"name": "x"})])
    eventsource_session.commit()
    eventsource_session.begin_nested()
    UserCreatedFactory.create()
    eventsource_session.commit()
    assert count(eventsource_session, "events") == 2


@pytest.mark.parametrize("round", [1, 2])
def test_same_aggregate_starts_at_version_one(eventsource_session, round):
    events = UserCreatedFactory.create_batch(3, aggregate_id="user-1")
    assert [e.aggregate_version for e in events] == [1, 2, 3]


def test_helper_applies_events_of_this_test(eventsource_session, read_model, run_projections):
    alice = UserCreatedFactory.create(payload={"name": "Alice"})
    UserCreatedFactory.create()
    EventFactory.create(aggregate_type="Order")
    handled = run_projections(UserNames())
    assert [e.aggregate_id for e in handled["user_names"]][0] == alice.aggregate_id
    assert len(handled["user_names"]) == 2
    assert count(eventsource_session, "user_names") == 2
    name = eventsource_session.execute(
        sa.text("SELECT name FROM user_names WHERE id = :id"), {"id": alice.aggregate_id}
    ).scalar_one()
    assert name == "Alice"
    # A second run continues from the checkpoint.
    UserCreatedFactory.create()
    assert len(run_projections(UserNames())["user_names"]) == 1


def test_helper_partitions(eventsource_session, read_model, run_projections):
    for _ in range(20):
        UserCreatedFactory.create()
    handled = run_projections(UserNames(), total_partitions=4, batch_size=3)
    assert len(handled["user_names"]) == 20
    assert count(eventsource_session, "user_names") == 20


def test_handler_error_surfaces(eventsource_session, run_projections):
    UserCreatedFactory.create()
    with pytest.raises(LookupError, match="no handler for UserCreated"):
        run_projections(Exploding())
"""


#: Inner runs: no cache folder, and no pytest-benchmark warning (errors here) under xdist.
QUIET = ("-p", "no:cacheprovider", "-p", "no:benchmark")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_args(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "sqlite":
        return []
    server: PostgresServer = request.getfixturevalue("pg_server")
    url = server.admin_url.render_as_string(hide_password=False)
    return ["--eventsource-db-url", url]


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(helpers=PROJECT, test_user_project=TESTS)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    return pytester


def test_plugin_in_a_user_project(project: pytest.Pytester, db_args: list[str]) -> None:
    result = project.runpytest_subprocess(*QUIET, *db_args)
    result.assert_outcomes(passed=7)


def test_plugin_under_xdist(project: pytest.Pytester, db_args: list[str]) -> None:
    result = project.runpytest_subprocess(*QUIET, "-n", "2", *db_args)
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*2 workers*"])


def test_factory_without_session_says_how_to_bind(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_unbound="""
        import pytest
        import eventsource as es
        from helpers import UserCreatedFactory

        def test_unbound():
            assert UserCreatedFactory.build().event_type == "UserCreated"
            with pytest.raises(es.ConfigurationError, match="eventsource_session"):
                UserCreatedFactory.create()
        """
    )
    result = project.runpytest_subprocess(*QUIET, "test_unbound.py")
    result.assert_outcomes(passed=1)
