"""The repository's Alembic environment: ``alembic upgrade head`` in a checkout.

``alembic.ini`` beside this folder points here (``script_location``) and at the revision
scripts inside the package (``version_locations = eventsource/migrations/versions``):
one copy of the scripts, the one pip installs and ``eventsource db upgrade`` runs. This
file only hands over to the library's environment, the same code that
``eventsource/migrations/env.py`` runs: target metadata, the
``eventsource_alembic_version`` table, ``$DATABASE_URL``, and the logging sections of
``alembic.ini``.

No ``__init__.py`` here, on purpose: with one, this folder would be a package named
``alembic`` and, with the repository root on ``sys.path``, would hide the real one.
"""

from __future__ import annotations

from eventsource import migrations_support

migrations_support.run_library_migrations()
