"""README python blocks run as written (on SQLite, in an empty folder, no DATABASE_URL)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def block_containing(text: str) -> str:
    """The README's one python block that contains ``text``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)
    matching = [str(block) for block in blocks if text in block]
    assert len(matching) == 1, f"expected one README python block with {text!r}"
    return matching[0]


def run_block(code: str, cwd: Path) -> str:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_retrying_command_snippet_runs(tmp_path: Path) -> None:
    assert run_block(block_containing("run_in_transaction"), tmp_path).split() == ["1", "2"]


def test_the_quick_start_runs_twice_in_an_empty_folder(tmp_path: Path) -> None:
    quick_start = block_containing("es.upgrade(engine)  # the library's Alembic migrations")
    for _ in range(2):  # a second run in the same folder works too
        lines = run_block(quick_start, tmp_path).splitlines()
        assert lines == ["2", "2 ['UserCreated', 'EmailChanged']"]
