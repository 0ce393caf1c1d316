"""Alembic environment for the library's own schema.

Run by :func:`eventsource.database.upgrade` and ``eventsource db upgrade`` (through
:func:`eventsource.database.alembic_config`), and by the repository's ``alembic/env.py``
(``alembic upgrade head`` in a checkout), which delegates here in the same way. The
work is done by :func:`eventsource.migrations_support.run_library_migrations`: the
library's metadata and version table, on the connection or engine handed over in
``config.attributes["connection"]`` (pytest-alembic hands an engine), else on
``sqlalchemy.url`` / ``$DATABASE_URL``.

Applications that run these scripts from their own Alembic environment do not use this
file; see the README ("Using your own Alembic").
"""

from __future__ import annotations

from eventsource import migrations_support

migrations_support.run_library_migrations()
