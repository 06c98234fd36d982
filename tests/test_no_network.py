"""The no-network guard of conftest.py, and fastdiff's imports under it.

fastdiff must run on clusters without internet access: nothing it imports or patches may
open a connection or resolve a host name. 203.0.113.0/24 (TEST-NET-3) is reserved for
documentation and is never routed, so a connection there could not succeed anyway.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import pytest

from conftest import OFFLINE_ENV, NetworkAccessAttempted

HERE = pathlib.Path(__file__).parent
UNROUTABLE = ("203.0.113.1", 80)


def _forget(guard, expected):
    """Check what the guard recorded, then clear it so the autouse check passes."""
    assert guard.attempts == expected
    guard.attempts.clear()


def test_guard_is_installed_and_children_inherit_offline_env(network_guard):
    assert network_guard.installed
    for name, value in OFFLINE_ENV.items():
        assert os.environ.get(name) == value, name


@pytest.mark.parametrize("how", ["connect", "connect_ex", "create_connection"])
def test_connect_to_unroutable_address_is_refused(network_guard, how):
    with pytest.raises(NetworkAccessAttempted, match=r"network access attempted: 203\.0\.113\.1:80"):
        if how == "create_connection":
            socket.create_connection(UNROUTABLE, timeout=1)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                getattr(sock, how)(UNROUTABLE)
    _forget(network_guard, ["203.0.113.1:80"])


def test_resolving_a_remote_name_is_refused(network_guard):
    with pytest.raises(NetworkAccessAttempted, match="network access attempted: example.com:443"):
        socket.getaddrinfo("example.com", 443)
    _forget(network_guard, ["example.com:443"])


def test_swallowed_attempt_is_still_recorded(network_guard):
    # Library code that catches every exception must not hide an attempt: the autouse
    # fixture fails the test from this record.
    try:
        socket.create_connection(UNROUTABLE, timeout=1)
    except Exception:
        pass
    _forget(network_guard, ["203.0.113.1:80"])


def _echo_server(family, host):
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(16))
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_connections_work(network_guard, host):
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        port = _echo_server(family, "127.0.0.1" if host == "localhost" else host)
    except OSError as e:  # e.g. IPv6 compiled in but disabled
        pytest.skip(f"cannot listen on {host}: {e}")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(16) == b"ping"
    assert network_guard.attempts == []


def test_unix_sockets_work(network_guard, tmp_path):
    path = str(tmp_path / "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    with server, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(16) == b"ping"
    assert network_guard.attempts == []


# A fresh interpreter, so that every module's import-time code runs under the guard
# (in this process most of fastdiff was imported long before this test).
_IMPORT_EVERYTHING = r"""
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import conftest
conftest.NETWORK_GUARD.install()
report = {"imported": [], "needs_cuda": {}, "errors": {}}

def try_import(name):
    try:
        importlib.import_module(name)
        report["imported"].append(name)
    except Exception as e:  # collected and reported by the test, not hidden
        target = "needs_cuda" if "cuda" in str(e).lower() else "errors"
        report[target][name] = f"{type(e).__name__}: {e}"

import fastdiff, fastdiff.kernels
for package in (fastdiff, fastdiff.kernels):
    try_import(package.__name__)
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        # Entry scripts (importing one runs it) and the C++ op library fastdiff._C, which a
        # --no-build-isolation install leaves in the package: it is loaded with
        # torch.ops.load_library, not imported (it has no PyInit function).
        if not info.name.endswith(".__main__") and info.name != "fastdiff._C":
            try_import(info.name)

# The diffusers swap-in path: diffusers' imports, a model built from a config (no
# from_pretrained), and fastdiff.patch importing diffusers' classes.
from diffusers import UNet2DModel
model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                    block_out_channels=(32, 32), norm_num_groups=8,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D"))
report["patch"] = str(fastdiff.patch(model))
report["attempts"] = conftest.NETWORK_GUARD.attempts
print(json.dumps(report))
"""


def test_importing_fastdiff_and_the_diffusers_patch_path_stays_offline():
    pytest.importorskip("diffusers")
    # Without the offline variables: the guard, not diffusers' offline mode, is under test.
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EVERYTHING, str(HERE)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    assert report["errors"] == {}
    for name in ("fastdiff.patch", "fastdiff.train.cli", "fastdiff.sample", "fastdiff.kernels.attention"):
        assert name in report["imported"], name
    assert "group_norm_silu" in report["patch"] and "fastdiff attention" in report["patch"]
