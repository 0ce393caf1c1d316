"""Every python block of the README runs as written, on SQLite and on PostgreSQL.

A block runs in an empty folder: without ``DATABASE_URL`` (so ``es.create_engine()``
makes its SQLite file there), then with ``DATABASE_URL`` naming an empty throwaway
PostgreSQL database. A block that defines ``test_`` functions is a test module and runs
under pytest with the shipped plugin instead (``--eventsource-db-url`` for PostgreSQL).
A block that cannot run alone (a piece of a larger file) is marked by the line
``<!-- fragment -->`` right before its fence; nothing else is exempt. The commands of
examples/README.md run the same way.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES_README = ROOT / "examples" / "README.md"
FRAGMENT = "<!-- fragment -->"
TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    heading: str
    fragment: bool

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{slug}-L{self.line}"


def blocks(path: Path, language: str) -> list[Block]:
    """The fenced blocks of one language in a markdown file, with their context."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        fence = re.fullmatch(r"```(\w*)\s*", line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if fence.group(1) == language:
                previous = lines[i - 1].strip() if i else ""
                code = "\n".join(lines[i + 1 : end]) + "\n"
                found.append(Block(language, code, i + 1, heading, previous == FRAGMENT))
            i = end + 1
            continue
        i += 1
    return found


PYTHON_BLOCKS = [b for b in blocks(README, "python") if not b.fragment]


def block_containing(text: str) -> Block:
    matching = [b for b in PYTHON_BLOCKS if text in b.code]
    assert len(matching) == 1, f"expected one runnable README python block with {text!r}"
    return matching[0]


#: What some blocks print, as their comments say (others are only required to succeed).
EXPECTED_OUTPUT = {
    "es.upgrade(engine)  # the library's Alembic migrations": [
        "2",
        "2 ['UserCreated', 'EmailChanged']",
    ],
    "run_in_transaction": ["1 2"],
    "store.mark_writer(session)": ["appended"],
    "sqlite_synchronous": ["2", "1"],  # FULL by default, then NORMAL when asked
    "class UserCounter": ["0"],
    "store.bulk_append(conn, history()": ["10000 100", "1 102"],
    "es.create_async_engine()  # $DATABASE_URL": [
        "1",
        "conflict, actual version 1",
        "['tea']",
        "True",
    ],
    "class CartLines": ["[2, 2] True", "4 -> 6", "[3, 3]", "[]"],
    "QUARANTINE_AGGREGATE": [
        "2",
        "2 KeyError None",
        "3 None 1",
        "applied (2, 3)",
        "[('acc-1', 125), ('acc-2', 7)]",
    ],
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTEST_ADDOPTS")}
    env.update(extra)
    return env


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def run_python_block(block: Block, cwd: Path, url: sa.URL | None) -> str:
    rendered = None if url is None else url.render_as_string(hide_password=False)
    if "def test_" in block.code:
        (cwd / "test_readme_block.py").write_text(block.code, encoding="utf-8")
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        argv += ["-p", "no:benchmark", "test_readme_block.py"]
        if rendered is not None:
            argv += ["--eventsource-db-url", rendered]
        return run(argv, cwd, clean_env())
    env = clean_env() if rendered is None else clean_env(DATABASE_URL=rendered)
    return run([sys.executable, "-c", block.code], cwd, env)


def check_output(block: Block, stdout: str) -> None:
    for marker, expected in EXPECTED_OUTPUT.items():
        if marker in block.code:
            assert stdout.splitlines() == expected, stdout


def test_every_block_is_runnable_or_a_declared_fragment() -> None:
    every = blocks(README, "python")
    assert len(PYTHON_BLOCKS) >= 6, "the README lost its runnable snippets"
    fragments = [b for b in every if b.fragment]
    # Fragments are the exception: a few pieces of larger files, each marked.
    assert len(fragments) <= len(every) // 2, [b.id for b in fragments]
    for marker in EXPECTED_OUTPUT:
        block_containing(marker)  # every expectation still has its block


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_block_runs_on_sqlite(block: Block, tmp_path: Path) -> None:
    check_output(block, run_python_block(block, tmp_path, None))


@pytest.mark.postgres
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_block_runs_on_postgresql(block: Block, tmp_path: Path, empty_pg_url: sa.URL) -> None:
    check_output(block, run_python_block(block, tmp_path, empty_pg_url))


def test_the_quick_start_runs_twice_in_an_empty_folder(tmp_path: Path) -> None:
    quick_start = block_containing("es.upgrade(engine)  # the library's Alembic migrations")
    for _ in range(2):  # a second run in the same folder works too
        check_output(quick_start, run_python_block(quick_start, tmp_path, None))


def test_the_snippets_share_one_default_database(tmp_path: Path) -> None:
    """Run one after another in one folder, as a reader would, they still work."""
    for block in PYTHON_BLOCKS:
        if "def test_" not in block.code:
            run_python_block(block, tmp_path, None)
    # The Quick start appended one UserCreated; the projection block counted it.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'eventsource.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT users FROM stats").scalar() == 1
    finally:
        engine.dispose()


# -- examples/README.md --------------------------------------------------------------


def example_commands(url: str | None) -> list[list[str]]:
    """The shell commands of examples/README.md, as argv lists, for one database.

    ``pip install`` (done once by the test run itself) and ``export`` lines are not
    run; a ``createdb`` line stands for the empty database the test made.
    """
    commands: list[list[str]] = []
    for block in blocks(EXAMPLES_README, "bash"):
        uses_pg = "DATABASE_URL=postgresql" in block.code
        if uses_pg != (url is not None):
            continue
        for raw in block.code.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith(("createdb ", "export ", "python -m pip install")):
                continue
            argv = shlex.split(line)
            assert argv[0] == "python", f"unexpected command in examples/README.md: {line}"
            commands.append([sys.executable, *argv[1:]])
    return commands


def test_examples_readme_commands_run_on_sqlite(tmp_path: Path) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    commands = example_commands(None)
    assert commands, "examples/README.md lost its commands"
    for argv in commands:
        run(argv, tmp_path, clean_env())
    assert (tmp_path / "eventsource.db").exists()  # the default, in the working directory


@pytest.mark.postgres
def test_examples_readme_commands_run_on_postgresql(tmp_path: Path, empty_pg_url: sa.URL) -> None:
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    rendered = empty_pg_url.render_as_string(hide_password=False)
    commands = example_commands(rendered)
    assert commands, "examples/README.md lost its PostgreSQL commands"
    for argv in commands:
        run(argv, tmp_path, clean_env(DATABASE_URL=rendered))
    engine = sa.create_engine(empty_pg_url.set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM events").scalar()
    finally:
        engine.dispose()


def test_fragment_marker_is_recognised(tmp_path: Path) -> None:
    """The parser itself: a marked block is a fragment, an unmarked one is not."""
    sample = tmp_path / "sample.md"
    marker = uuid.uuid4().hex
    sample.write_text(
        f"# Title\n\n{FRAGMENT}\n```python\nx = 1\n```\n\n```python\nprint('{marker}')\n```\n",
        encoding="utf-8",
    )
    found = blocks(sample, "python")
    assert [b.fragment for b in found] == [True, False]
    assert marker in found[1].code


def test_the_error_tree_names_every_error() -> None:
    """The README's error tree lists every error class the library defines."""
    import eventsource as es
    from eventsource import errors

    section = README.read_text(encoding="utf-8").split("## Errors", 1)[1].split("\n## ", 1)[0]
    tree = blocks_in(section)
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, es.EventSourceError)
    }
    listed = set(re.findall(r"^[│├└─ ]*([A-Z]\w+Error)\b", tree, re.MULTILINE))
    assert listed == defined
    assert defined <= set(es.__all__)  # and each one is exported


def blocks_in(markdown: str) -> str:
    """The first fenced block of a piece of markdown."""
    return markdown.split("```", 2)[1]
