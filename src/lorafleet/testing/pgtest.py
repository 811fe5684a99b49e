"""A throwaway PostgreSQL server for tests and benchmarks.

>>> with TempPostgres() as pg:
...     reg = Registry(pg.create_database("t1"), blob_url)

``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/<ver>/bin`` (or ``$LORAFLEET_PG_BIN``), data
dir in a temp dir, listening on a free loopback port with its unix socket in the temp dir.
PostgreSQL refuses to run as root, so when we are root the server runs as the ``postgres``
OS user (via ``runuser``). ``fsync=False`` (the default here) trades durability for speed,
which is right for tests; benchmarks that time commits pass ``fsync=True``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb``/``pg_ctl``, or None when PostgreSQL is not installed."""
    candidates = [os.environ.get("LORAFLEET_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for cand in candidates:
        if cand and (Path(cand) / "initdb").is_file() and (Path(cand) / "pg_ctl").is_file():
            return Path(cand)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def unavailable_reason() -> str | None:
    """Why a TempPostgres cannot start here, or None if it can."""
    if find_bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; install postgresql or set LORAFLEET_PG_BIN"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' OS user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root but `runuser` is missing"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    """Start a private PostgreSQL server on enter, stop it and delete its files on exit."""

    def __init__(self, *, fsync: bool = False, settings: dict[str, str] | None = None, user: str = "postgres"):
        self.fsync = fsync
        self.settings = dict(settings or {})
        self.user = user
        self.bin_dir = find_bin_dir()
        self.tmp: Path | None = None
        self.port: int | None = None

    # -- process helpers
    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def _run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self._as_owner(argv), capture_output=True, text=True, check=False, **kwargs)

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            log = ""
            if self.tmp and (self.tmp / "server.log").exists():
                log = (self.tmp / "server.log").read_text()[-2000:]
            raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()}\n{log}")

    # -- lifecycle
    def start(self) -> TempPostgres:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        assert self.bin_dir is not None
        self.tmp = Path(tempfile.mkdtemp(prefix="lorafleet-pg-"))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        (self.tmp / "sock").mkdir()
        if os.geteuid() == 0:
            os.chown(self.tmp / "sock", pw.pw_uid, pw.pw_gid)
        self._check(
            self._run([str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user, "--auth=trust",
                       "-E", "UTF8", "--locale=C", "--no-sync"]),
            "initdb",
        )
        opts = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.tmp / "sock"),
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on" if self.fsync else "off",
            "full_page_writes": "on" if self.fsync else "off",
            "max_connections": "200",
            **self.settings,
        }
        last_error: Exception | None = None
        for _ in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            flags = " ".join(f"-c {k}={v}" for k, v in {**opts, "port": str(self.port)}.items())
            proc = self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                              str(self.tmp / "server.log"), "-o", flags, "-w", "-t", "60", "start"])
            try:
                self._check(proc, "pg_ctl start")
                return self
            except RuntimeError as exc:
                last_error = exc
                time.sleep(0.2)
        raise RuntimeError(f"could not start PostgreSQL: {last_error}")

    def stop(self) -> None:
        if self.tmp is None:
            return
        if self.bin_dir is not None and (self.data_dir / "postmaster.pid").exists():
            self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None

    def __enter__(self) -> TempPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases
    @property
    def data_dir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """Create ``dbname`` (UTF8, C collation) and return its SQLAlchemy URL."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", dbname):
            raise ValueError(f"database name {dbname!r}: use lowercase letters, digits and '_'")

        with contextlib.closing(psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                                                dbname="postgres", autocommit=True)) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}" TEMPLATE template0 ENCODING \'UTF8\' LC_COLLATE \'C\' '
                         "LC_CTYPE 'C'")
        return self.url(dbname)

    def database_size(self, dbname: str) -> int:
        import psycopg

        with contextlib.closing(psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                                                dbname="postgres", autocommit=True)) as conn:
            return int(conn.execute("SELECT pg_database_size(%s)", (dbname,)).fetchone()[0])
