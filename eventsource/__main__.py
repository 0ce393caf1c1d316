"""``python -m eventsource`` is the ``eventsource`` command."""

from __future__ import annotations

from eventsource.cli import main

main(prog_name="eventsource")
