"""Shared test setup.

Triton's interpreter is chosen when a kernel is *decorated* (import time), so the
interpreted kernel tests live in tests/interpret/ and run in their own process with
TRITON_INTERPRET=1 (see test_interpreted_kernels.py). The main process never sets it,
so the CPU fallbacks of the custom ops and the GPU-compile tests run here.

No test may reach the network (fastdiff must run on offline clusters and never download
a model or a data set). Two layers enforce it:

* in this process (and in children forked from it), ``NetworkGuard`` patches the Python
  socket layer from ``pytest_configure`` on, so collection-time imports are covered too:
  connecting to, or resolving, anything but loopback raises ``NetworkAccessAttempted``,
  and the autouse fixture ``_no_network_access`` fails the test even when library code
  swallowed that error. Native code (gloo, TCPStore) is not patched; it only ever
  talks to loopback here.
* children started with ``subprocess`` (torchrun, the interpreter tests) do not inherit a
  monkeypatch. They inherit ``OFFLINE_ENV`` instead, which turns the Hugging Face stack
  (diffusers, huggingface_hub) into offline mode, so a download there fails fast.
"""
import ipaddress
import os
import socket

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Collected only by the subprocess that sets TRITON_INTERPRET=1.
collect_ignore = [] if INTERPRETED else ["interpret"]

# Inherited by every child process the tests start.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


class NetworkAccessAttempted(RuntimeError):
    """Raised by the guard. A RuntimeError, not an OSError: retry loops written for
    connection errors must not swallow it and sleep."""


class NetworkGuard:
    """Refuse every socket connection and name lookup that leaves this machine.

    Allowed: loopback addresses (127.0.0.0/8, ::1, IPv4-mapped loopback), the names
    ``localhost`` and this machine's own host name, AF_UNIX and other non-IP sockets.
    Every refusal is also recorded in ``attempts`` ("host:port"), so that a test fails
    even when the code under test catches the exception.
    """

    def __init__(self):
        self.attempts = []
        self._originals = None
        self._local_names = {"localhost", "localhost.localdomain", socket.gethostname().lower()}

    @property
    def installed(self):
        return self._originals is not None

    def is_local(self, host):
        if host is None:  # getaddrinfo(None, port): the wildcard / loopback address
            return True
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        host = str(host).strip("[]").split("%", 1)[0].lower()  # "[::1]", "fe80::1%eth0"
        if host in self._local_names or host.endswith(".localhost"):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False  # a name other than ours: resolving it would ask a DNS server
        mapped = getattr(ip, "ipv4_mapped", None)
        return ip.is_loopback or ip.is_unspecified or (mapped is not None and mapped.is_loopback)

    def refuse(self, host, port):
        where = f"{host}:{port}"
        self.attempts.append(where)
        raise NetworkAccessAttempted(f"network access attempted: {where}")

    def _check_address(self, sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple):
            if not self.is_local(address[0]):
                self.refuse(address[0], address[1] if len(address) > 1 else "?")

    def install(self):
        if self.installed:
            return
        guard = self
        originals = {
            "connect": socket.socket.connect,
            "connect_ex": socket.socket.connect_ex,
            "create_connection": socket.create_connection,
            "getaddrinfo": socket.getaddrinfo,
        }

        def connect(sock, address):
            guard._check_address(sock, address)
            return originals["connect"](sock, address)

        def connect_ex(sock, address):
            guard._check_address(sock, address)
            return originals["connect_ex"](sock, address)

        def create_connection(address, *args, **kwargs):
            if not guard.is_local(address[0]):
                guard.refuse(address[0], address[1])
            return originals["create_connection"](address, *args, **kwargs)

        def getaddrinfo(host, port, *args, **kwargs):
            if not guard.is_local(host):
                guard.refuse(host, port)
            return originals["getaddrinfo"](host, port, *args, **kwargs)

        socket.socket.connect = connect
        socket.socket.connect_ex = connect_ex
        socket.create_connection = create_connection
        socket.getaddrinfo = getaddrinfo
        self._originals = originals

    def uninstall(self):
        if not self.installed:
            return
        socket.socket.connect = self._originals["connect"]
        socket.socket.connect_ex = self._originals["connect_ex"]
        socket.create_connection = self._originals["create_connection"]
        socket.getaddrinfo = self._originals["getaddrinfo"]
        self._originals = None


NETWORK_GUARD = NetworkGuard()


def pytest_configure(config):
    os.environ.update(OFFLINE_ENV)
    NETWORK_GUARD.install()


def pytest_unconfigure(config):
    NETWORK_GUARD.uninstall()


@pytest.fixture
def network_guard():
    """The process-wide guard, for tests that exercise it (and must forget what they did)."""
    return NETWORK_GUARD


@pytest.fixture(autouse=True)
def _no_network_access():
    # Not cleared before the test: an attempt made during collection fails the first test.
    yield
    if NETWORK_GUARD.attempts:
        attempts = ", ".join(NETWORK_GUARD.attempts)
        NETWORK_GUARD.attempts.clear()
        pytest.fail(f"network access attempted: {attempts}", pytrace=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
