"""A real PostgreSQL server for the tests: Debian's binaries (`make postgresql` installs the
`postgresql` package), a fresh cluster in a temporary directory on a free port.

PostgreSQL refuses to run as root ("root" execution of the PostgreSQL server is not
permitted, postgres(1)), and the tests run as root on CI: then the cluster belongs to,
and the server runs as, the unprivileged `postgres` user the Debian package creates (via
`runuser`); as any other user, as that user. Password authentication (scram-sha-256) is
on, so the URL's password is really needed, and is a real secret to keep out of output.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

#: Where Debian puts a version's server binaries (the newest is used); PG_BIN overrides.
DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"
RUN_AS = "postgres"


def binaries() -> Path:
    """The directory of initdb, pg_ctl and postgres."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(glob.glob(DEBIAN_BINARIES), key=lambda p: int(Path(p).parent.name))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql: run "
                           "`make postgresql` (Debian's postgresql package)")
    return Path(found[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One cluster: `start()`, `stop()` (fast shutdown: connections are cut), `start()`
    again on the same port and data, `destroy()`. `url(db)` is a URL with the password."""

    def __init__(self) -> None:
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="fp-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "audit"
        self.password = "pw-" + secrets.token_hex(12)
        self._as_root = os.geteuid() == 0
        if self._as_root:  # the server's files belong to the user it runs as
            owner = pwd.getpwnam(RUN_AS)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync")
        pwfile.unlink()

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", RUN_AS, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                             cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr or out.stdout}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                  "-w", "-t", "120", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "120", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def pids(self) -> list[int]:
        """The server's processes: the postmaster and every process it started."""
        postmaster = self.postmaster()
        children = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == postmaster:
                children.append(int(Path(stat).parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """Stop every process of the server (SIGSTOP): connections stay open, nothing
        answers, as with a server stuck on its disk."""
        # The postmaster first, so that it starts no process after the listing.
        os.kill(self.postmaster(), signal.SIGSTOP)
        self._signal_all(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in self.pids():
            # A backend whose connection closed may exit between the listing and this.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
