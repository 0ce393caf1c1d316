"""bench/soak.py still runs and passes its own check, with small numbers (about 10 s).

The script starts its own throwaway cluster (tests/pg_cluster.py) and restarts it; the
shared test server is never touched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


@pytest.mark.slow
@pytest.mark.postgres
def test_soak_loses_and_doubles_nothing_through_a_server_restart() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--writers",
            "2",
            "--restarts",
            "1",
            "--restart-every",
            "1.5",
            "--catch-up-timeout",
            "15",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "OK: nothing lost, nothing doubled" in done.stdout
    assert "runner raised: no" in done.stdout
