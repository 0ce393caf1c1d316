"""TableNames: refused up front when PostgreSQL would mangle them, and odd names that work.

PostgreSQL truncates identifiers past 63 bytes with only a NOTICE, so a long events
table name would silently merge derived names (constraints, the version table):
refused when the TableNames is built. A ``%`` in a name must survive Alembic's
ConfigParser and the drivers' placeholders: migrated, appended, projected, rebased on
SQLite and PostgreSQL.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import cluster, database, models
from eventsource.status import status

ODD = models.TableNames(
    events="ev%ents",
    aggregate_heads='he%ads "quoted"',
    projection_checkpoints="check%points",
)


def test_the_cluster_record_is_named_after_the_events_table() -> None:
    assert models.TableNames().cluster == "events_cluster"
    assert models.TableNames(events="app_events").cluster == "app_events_cluster"
    assert models.TableNames(cluster="events_cluster") == models.TableNames()
    assert models.TableNames(events="a", cluster="mine").cluster == "mine"


def test_the_dead_letters_are_named_after_the_events_table() -> None:
    assert models.TableNames().dead_letters == "events_dead_letters"
    assert models.TableNames(events="app_events").dead_letters == "app_events_dead_letters"
    assert models.TableNames(dead_letters="events_dead_letters") == models.TableNames()
    assert models.TableNames(events="a", dead_letters="mine").dead_letters == "mine"
    assert models.tables_for(models.TableNames(events="a")).dead_letters.name == ("a_dead_letters")
    assert database.VERSION_TABLE == models.VERSION_TABLE


def test_names_that_would_exceed_63_bytes_are_refused() -> None:
    longest = "e" * (63 - len("eventsource_alembic_version_"))
    assert models.TableNames(events=longest).events == longest  # exactly at the limit
    with pytest.raises(es.ConfigurationError) as info:
        models.TableNames(events=longest + "e")
    message = str(info.value)
    assert "TableNames.events" in message
    assert f"eventsource_alembic_version_{longest}e" in message
    assert "64 bytes" in message
    assert "63" in message
    # Bytes, not characters: PostgreSQL's limit is on the encoded name.
    with pytest.raises(es.ConfigurationError, match=r"TableNames\.events"):
        models.TableNames(events="é" * 18)
    with pytest.raises(es.ConfigurationError, match=r"TableNames\.aggregate_heads.*pk_"):
        models.TableNames(aggregate_heads="h" * 61)
    with pytest.raises(es.ConfigurationError, match=r"TableNames\.cluster"):
        models.TableNames(cluster="c" * 64)
    # The longest events name still leaves room for the dead letters' derived names.
    assert len(f"ix_{models.TableNames(events=longest).dead_letters}_aggregate") <= 63
    with pytest.raises(es.ConfigurationError, match=r"TableNames\.dead_letters.*ix_d+_aggregate"):
        models.TableNames(dead_letters="d" * 51)
    with pytest.raises(es.ConfigurationError, match="63"):
        es.EventStore(table_names=models.TableNames(projection_checkpoints="p" * 62))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("events", ""),
        ("events", "   "),
        ("aggregate_heads", None),
        ("projection_checkpoints", 7),
        ("cluster", "a\x00b"),
        ("dead_letters", "   "),
        ("partition_claims", "   "),
        ("partition_workers", None),
        ("events", "\ud800"),
    ],
)
def test_names_must_be_non_empty_text(field: str, value: object) -> None:
    with pytest.raises(es.ConfigurationError, match=f"TableNames.{field}"):
        models.TableNames(**{field: value})  # type: ignore[arg-type]


def test_names_must_differ() -> None:
    with pytest.raises(es.ConfigurationError, match="8 different tables"):
        models.TableNames(events="t", aggregate_heads="t")
    with pytest.raises(es.ConfigurationError, match="8 different tables"):
        models.TableNames(cluster="events")
    with pytest.raises(es.ConfigurationError, match="8 different tables"):
        models.TableNames(dead_letters="events_cluster")
    with pytest.raises(es.ConfigurationError, match="8 different tables"):
        models.TableNames(partition_claims="events_projection_versions")
    with pytest.raises(es.ConfigurationError, match="8 different tables"):
        models.TableNames(partition_workers="events_partition_claims")


def test_a_percent_sign_in_names_migrates_and_round_trips(empty_engine: sa.Engine) -> None:
    es.upgrade(empty_engine, table_names=ODD)
    tables = set(sa.inspect(empty_engine).get_table_names())
    assert tables == {
        "ev%ents",
        'he%ads "quoted"',
        "check%points",
        "ev%ents_cluster",
        "ev%ents_dead_letters",
        "ev%ents_projection_versions",
        "ev%ents_partition_claims",
        "ev%ents_partition_workers",
        "eventsource_alembic_version_ev%ents",
    }
    assert database.current_revision(empty_engine, table_names=ODD) == database.head_revision()

    store = es.EventStore(table_names=ODD)
    event = es.Event(bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E")
    with Session(empty_engine) as session, session.begin():
        store.append(session, [event], es.ExpectedVersion.no_stream())
    with (
        pytest.raises(es.OptimisticConcurrencyError),  # through the conflict path's own query
        Session(empty_engine) as session,
        session.begin(),
    ):
        store.append(session, [event], es.ExpectedVersion.no_stream())
    with Session(empty_engine) as session:
        assert [e.event_id for e in store.read_stream(session, "b", "A", "1")] == [event.event_id]

    class Counter(es.Projection):
        name = "counter"
        seen = 0

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            Counter.seen += 1

    processor = es.Processor(empty_engine, store)
    assert processor.run_until_caught_up(Counter()) == 1
    [row] = status(empty_engine, store=store)
    assert (row.projection, row.lag) == ("counter", 0)
    with empty_engine.begin() as conn:
        cluster.check(conn, store.tables)
    assert not cluster.rebase(empty_engine, store=store).rebased

    es.downgrade(empty_engine, table_names=ODD)
    assert set(sa.inspect(empty_engine).get_table_names()) <= {
        "eventsource_alembic_version_ev%ents"
    }


def new_event() -> es.Event:
    return es.Event(bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E")


@pytest.mark.postgres
def test_a_percent_sign_in_names_rebases(empty_pg_url: sa.URL) -> None:
    engine = es.create_engine(empty_pg_url, poolclass=sa.NullPool)
    try:
        es.upgrade(engine, table_names=ODD)
        store = es.EventStore(table_names=ODD)
        for _ in range(2):
            with Session(engine) as session, session.begin():
                store.append(
                    session,
                    [
                        es.Event(
                            bounded_context="b",
                            aggregate_type="A",
                            aggregate_id="1",
                            event_type="E",
                        )
                    ],
                )
        with engine.begin() as conn:
            cluster.check(conn, store.tables)
            for table in ("ev%%ents", 'he%%ads ""quoted""'):
                conn.exec_driver_sql(
                    f'UPDATE "{table}" SET transaction_id = CAST(CAST('
                    "transaction_id::text::bigint + 1000000000 AS text) AS xid8)"
                )
        with pytest.raises(es.TransactionIdsAheadError, match="ev%ents"), engine.begin() as conn:
            cluster.check(conn, store.tables)
        result = cluster.rebase(engine, store=store)
        assert (result.events, result.aggregate_heads) == (2, 1)
        with Session(engine) as session, session.begin():
            store.append(
                session,
                [
                    es.Event(
                        bounded_context="b", aggregate_type="A", aggregate_id="1", event_type="E"
                    )
                ],
                es.ExpectedVersion.exact(2),
            )
    finally:
        engine.dispose()
