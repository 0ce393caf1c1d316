"""A throwaway PostgreSQL cluster for tests that need a second server.

``initdb`` + ``pg_ctl`` in a fresh temporary directory on a free port, run as the
``postgres`` OS user (through ``runuser`` when the tests run as root, directly
otherwise). :func:`throwaway_cluster` always stops and removes it, however the test
ends. It never restarts or touches the shared test server: a restore into a cluster
whose transaction counter is behind needs a cluster of its own.

The binaries come from ``EVENTSOURCE_TEST_PG_BINDIR``, else ``pg_config --bindir``,
else the newest ``/usr/lib/postgresql/*/bin``, else ``initdb`` on the PATH.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

#: The OS user that owns the cluster's files and runs the server.
OS_USER = "postgres"
#: Seconds any one tool may take.
TOOL_TIMEOUT = 120


class ClusterUnavailableError(RuntimeError):
    """No PostgreSQL server binaries here, or the cluster would not start."""


@dataclass(frozen=True, slots=True)
class Cluster:
    """A running throwaway cluster: trust auth, superuser ``postgres``."""

    bindir: Path
    datadir: Path
    port: int
    url: sa.URL
    """Its ``postgres`` database, through psycopg 3."""
    root: Path
    options: str
    """The server options it was started with (port, socket directory, settings)."""

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back and disconnect every session)."""
        _run(self.bindir, self.root, "pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def start(self) -> None:
        """Start it again, on the same port with the same options."""
        log = self.root / f"server-{self.port}.log"
        _run(
            self.bindir,
            self.root,
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(log),
            "-o",
            self.options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def tool(self, name: str) -> str:
        """Path of one of the cluster's client or server programs (pg_dump, psql...)."""
        return str(self.bindir / name)

    def database_url(self, name: str) -> sa.URL:
        return self.url.set(database=name)


def find_bindir() -> Path | None:
    """Directory of ``initdb`` and ``pg_ctl``, or None when PostgreSQL is not installed."""
    explicit = os.environ.get("EVENTSOURCE_TEST_PG_BINDIR")
    candidates: list[Path] = [Path(explicit)] if explicit else []
    pg_config = shutil.which("pg_config")
    if pg_config:
        done = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=30
        )
        if done.returncode == 0:
            candidates.append(Path(done.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name) if Path(path).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(path) for path in versions)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def server_major_version(bindir: Path) -> int:
    """Major version of the binaries (``initdb --version``: ``initdb (PostgreSQL) 15.4``)."""
    done = subprocess.run(
        [str(bindir / "initdb"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return int(done.stdout.split()[-1].split(".")[0])


@contextmanager
def throwaway_cluster(
    bindir: Path | None = None, settings: dict[str, str] | None = None
) -> Iterator[Cluster]:
    """Start a new cluster, yield it, then stop it and delete its files (always).

    ``settings`` adds server settings (``-c name=value``), e.g. ``max_prepared_transactions``.
    """
    bindir = bindir or find_bindir()
    if bindir is None:
        raise ClusterUnavailableError("no PostgreSQL server binaries (initdb, pg_ctl) found")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        raise ClusterUnavailableError("running as root without runuser to become postgres")
    # Not under pytest's tmp_path: its directories are private to root, and the
    # server, running as postgres, must reach its own files and socket.
    root = Path(tempfile.mkdtemp(prefix="eventsource-pg-"))
    datadir = root / "data"
    try:
        if as_root:
            shutil.chown(root, OS_USER, OS_USER)
        _run(
            bindir,
            root,
            "initdb",
            "-D",
            str(datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        port, options = _start(bindir, root, datadir, settings or {})
        url = sa.URL.create(
            "postgresql+psycopg",
            username="postgres",
            host="127.0.0.1",
            port=port,
            database="postgres",
        )
        yield Cluster(bindir, datadir, port, url, root, options)
    finally:
        if (datadir / "postmaster.pid").exists():
            _run(
                bindir,
                root,
                "pg_ctl",
                "-D",
                str(datadir),
                "-m",
                "immediate",
                "-w",
                "stop",
                check=False,
            )
        shutil.rmtree(root, ignore_errors=True)


def _start(
    bindir: Path, root: Path, datadir: Path, settings: dict[str, str], attempts: int = 3
) -> tuple[int, str]:
    """Start the server on a free port (another process may take it first: retry)."""
    failure = ""
    for _ in range(attempts):
        port = _free_port()
        options = " ".join(
            [
                f"-p {port}",
                f"-k {root}",
                "-c listen_addresses=127.0.0.1",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=20",
                "-c shared_buffers=16MB",
                *(f"-c {name}={value}" for name, value in settings.items()),
            ]
        )
        log = root / f"server-{port}.log"
        done = _run(
            bindir,
            root,
            "pg_ctl",
            "-D",
            str(datadir),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if done.returncode == 0:
            return port, options
        failure = f"{done.stdout}\n{done.stderr}\n{log.read_text() if log.exists() else ''}"
    raise ClusterUnavailableError(f"the throwaway cluster did not start:\n{failure}")


def _run(
    bindir: Path, cwd: Path, program: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [str(bindir / program), *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", OS_USER, "--", *command]
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, timeout=TOOL_TIMEOUT
    )
    if check and done.returncode != 0:
        raise ClusterUnavailableError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
