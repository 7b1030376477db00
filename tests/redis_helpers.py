"""A private redis-server on a loopback port, for the fleet's tests.

Each test starts its own (no test depends on a Redis it did not start), in its own process
group and directory, with persistence off; it is stopped even when the test fails. Without
redis-server the tests skip, or fail when MAHOLE_REQUIRE_REDIS=1 (as in CI)."""

import os
import shutil
import signal
import subprocess
import time

import pytest
import redis

from ports import free_port

REQUIRE_ENV = "MAHOLE_REQUIRE_REDIS"


def need_redis():
    if shutil.which("redis-server"):
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail("redis-server is not installed (Debian package redis-server); "
                    f"{REQUIRE_ENV}=1 requires the fleet's tests to run")
    pytest.skip("redis-server is not installed (Debian package redis-server)")


class RedisServer:
    """`tls`: (ca, cert, key) files: TLS only (rediss://), clients checked against ca."""

    def __init__(self, directory, tls=None):
        self.directory = directory
        self.port = free_port()
        self.tls = tls
        self.proc = None

    @property
    def url(self):
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[0]}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout=10.0):
        """Start (or start again, on the same port) and wait until it answers PING."""
        os.makedirs(self.directory, exist_ok=True)
        ports = ["--port", str(self.port)]
        if self.tls:
            ca, cert, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-ca-cert-file", ca,
                     "--tls-cert-file", cert, "--tls-key-file", key, "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", *ports, "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=0.5,
                                      socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.02)
        client.close()
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within "
                           f"{timeout:g} s")

    def stop(self):
        """Kill it (as a crash would), process group and all."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    need_redis()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
