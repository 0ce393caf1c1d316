"""Helpers the library's migration scripts call at run time."""

from __future__ import annotations

from alembic import context

from eventsource import database, models


def table_names() -> models.TableNames:
    """Table names for this migration run.

    Taken from ``config.attributes`` (programmatic runs) or ``-x events_table=...``
    style arguments (command line); the defaults otherwise, which is what an
    application's own Alembic environment gets.
    """
    given = context.config.attributes.get(database.TABLE_NAMES_ATTRIBUTE)
    if isinstance(given, models.TableNames):
        return given
    x = context.get_x_argument(as_dictionary=True)
    defaults = models.TableNames()
    return models.TableNames(
        events=x.get("events_table", defaults.events),
        aggregate_heads=x.get("aggregate_heads_table", defaults.aggregate_heads),
        projection_checkpoints=x.get(
            "projection_checkpoints_table", defaults.projection_checkpoints
        ),
        cluster=x.get("cluster_table", ""),  # empty: derived from the events table's name
        dead_letters=x.get("dead_letters_table", ""),  # likewise
    )
