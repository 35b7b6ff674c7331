"""The device server (`forgeml device serve`): a token for every client, names confined to the
session's work directory, no client blocking another, idle sessions closed. A real server in a
subprocess, real TVM RPC clients; no cross toolchain needed."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from forgeml.cli import main
from forgeml.errors import InvalidInput
from forgeml.targets import rpc as rpc_device
from forgeml.targets.rpc_server import TOKEN_ENV, confine, is_loopback, server_token

TOKEN = "test-token-4f8a1c9e2b7d"
IDLE_S = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(address, log file) of a token-guarded server on loopback with a 3 s idle timeout."""
    log = tmp_path_factory.mktemp("rpc") / "server.log"
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "forgeml.cli", "device", "serve", "--port", str(port),
                                 "--idle-timeout", str(IDLE_S)], stdout=out, stderr=subprocess.STDOUT,
                                env=_env(**{TOKEN_ENV: TOKEN}), start_new_session=True)
    deadline = time.monotonic() + 120
    while "serving TVM RPC on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    assert f"127.0.0.1:{port} ({platform.machine()}); token required, idle timeout {IDLE_S} s" in log.read_text()
    yield f"127.0.0.1:{port}", log
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def _tvm_connect(address: str, key: str):
    from tvm import rpc

    host, port = address.split(":")
    return rpc.connect(host, int(port), key, session_timeout=60)


@pytest.mark.parametrize("module", [["-m", "forgeml.cli", "device", "serve"], ["-m", "forgeml.targets.rpc"]])
def test_serving_beyond_loopback_without_a_token_is_refused(module):
    try:
        done = subprocess.run([sys.executable, *module, "--host", "0.0.0.0", "--port", str(free_port())],
                              env=_env(), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started on 0.0.0.0 without a token")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "needs a token" in done.stderr


def test_token_rules():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("device.lan")
    assert server_token("127.0.0.1", None) is None or os.environ.get(TOKEN_ENV)
    with pytest.raises(InvalidInput, match="at least 16"):
        server_token("0.0.0.0", "short")
    assert server_token("0.0.0.0", TOKEN) == TOKEN


def test_clients_without_the_token_are_refused(server, monkeypatch):
    address, _ = server
    for key in ("", " -forgeml-token=wrong-token-0000000000", f" -forgeml-token={TOKEN}x"):
        with pytest.raises(Exception, match="matches key"):
            _tvm_connect(address, key)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(InvalidInput, match="refused the key or token .no token given"):
        rpc_device.connect(rpc=address)


def test_the_token_holder_benchmarks_over_rpc(server, compiled_mlp, monkeypatch, tmp_path, capsys):
    address, _ = server
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert rpc_device.remote_info(rpc_device.connect(rpc=address))["arch"]
    _, artifact = compiled_mlp
    code = main(["bench", str(artifact), "--rpc", address, "--repeat", "5", "--warmup", "1", "--no-memory"])
    assert code == 0, capsys.readouterr().err
    assert ", rpc x86_64)" in capsys.readouterr().out


def test_uploads_and_downloads_stay_in_the_work_directory(server, tmp_path):
    address, _ = server
    remote = _tvm_connect(address, f" -forgeml-token={TOKEN}")
    source = tmp_path / "payload.txt"
    source.write_text("payload")
    remote.upload(str(source), "ok.txt")
    assert remote.download("ok.txt") == b"payload"
    outside = tmp_path / "written-from-rpc.txt"
    for name in ("../escaped.txt", "../../escaped.txt", str(outside)):
        with pytest.raises(Exception, match="outside the session's work directory"):
            remote.upload(str(source), name)
    assert not outside.exists()
    for name in ("/etc/hostname", "../../../../etc/hostname", str(source)):
        with pytest.raises(Exception, match="outside the session's work directory"):
            remote.download(name)
    with pytest.raises(Exception, match="outside the session's work directory"):
        remote.get_function("tvm.rpc.server.load_module")("/usr/lib/x86_64-linux-gnu/libm.so.6")


def test_confine_refuses_symlinks_out(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "link").symlink_to(tmp_path)
    assert confine(work, "a/b.so") == (work / "a/b.so").resolve()
    for name in ("link/x", "..", "/etc/passwd", "a/../../x"):
        with pytest.raises(ValueError, match="outside"):
            confine(work, name)


def test_an_idle_connection_blocks_no_other_client(server):
    """Connections that never send the handshake (TVM's own server waited on them forever)."""
    address, _ = server
    host, port = address.split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(3)]
    result: dict[str, object] = {}

    def client() -> None:
        try:
            result["info"] = _tvm_connect(address, f" -forgeml-token={TOKEN}").get_function(rpc_device.DEVICE_INFO)()
        except Exception as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=client, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(timeout=20)
    try:
        assert not thread.is_alive(), "a client waited behind idle connections"
        assert "info" in result, result
        assert time.monotonic() - start < 10
    finally:
        for s in idle:
            s.close()


def test_an_idle_session_is_closed(server):
    address, log = server
    remote = _tvm_connect(address, f" -forgeml-token={TOKEN}")
    assert remote.get_function(rpc_device.DEVICE_INFO)()
    time.sleep(IDLE_S + 2)
    with pytest.raises(Exception):  # noqa: B017 (TVM raises its own error types for a closed session)
        remote.get_function(rpc_device.DEVICE_INFO)()
    deadline = time.monotonic() + 10
    while "ended (idle timeout)" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "ended (idle timeout)" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_missing_toolchains_skip_with_the_reason_and_fail_in_ci(tmp_path):
    """tests/test_targets.py with the cross compilers and qemu off PATH: skips naming `make toolchains`
    (a fresh clone's `make test`), and failures under FORGEML_REQUIRE_TOOLCHAINS=1 (CI)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            if not entry.name.startswith(("aarch64-", "riscv64-", "qemu-")) and not (bin_dir / entry.name).exists():
                (bin_dir / entry.name).symlink_to(entry.path)
    tests = Path(__file__).parent
    select = ["-k", "elf_for_their_machine or record_why or riscv64_emulation"]
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tests / "test_targets.py")]
    env = _env(PATH=str(bin_dir))
    env.pop("FORGEML_REQUIRE_TOOLCHAINS", None)
    done = subprocess.run(base + select, env=env, capture_output=True, text=True, timeout=600, cwd=tests.parent)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 skipped" in done.stdout and "cross toolchain missing" in done.stdout
    assert "run `make toolchains`" in done.stdout
    env["FORGEML_REQUIRE_TOOLCHAINS"] = "1"
    done = subprocess.run(base + select, env=env, capture_output=True, text=True, timeout=600, cwd=tests.parent)
    assert done.returncode == 1 and "3 error" in done.stdout, done.stdout[-3000:]
