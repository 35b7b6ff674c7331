"""Real devices over TVM RPC: the device-side server and the host-side remote benchmark.

Device side (`forgeml device serve`, or `python -m forgeml.targets.rpc` where click is not
installed): TVM's own RPC server, started in this process (the stock launcher re-executes
`sys.executable`, which fails under qemu without binfmt) with `TVM_USE_RUNTIME_LIB=1`, so `import
tvm` loads libtvm_runtime.so only: the server never compiles, and a device needs the TVM wheel's
Python files plus the 3 MB runtime library, not the 240 MB compiler. It also registers
`forgeml.device.info`, which tells the host the device's architecture.

Host side: upload the artifact's library, load it and its weights (as tensors) on the device,
time `main` there with TVM's time_evaluator, and fetch the outputs back to compare with ONNX Runtime
on the host.

Only standard-library imports at module level: this module is also copied into emulated devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgeml.errors import ForgeError, InvalidInput

DEVICE_INFO = "forgeml.device.info"
_READY = "forgeml: serving TVM RPC on"


def _one_line(e: Exception) -> str:
    """TVM's RPC errors start with a generic line ("RPCError: Error caught from RPC call:"): keep the last."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInput(f"{what} '{text}' is not HOST:PORT (e.g. 127.0.0.1:9090)")
    return host, int(port)


def _import_rpc_server():
    """TVM's RPC server module, with TVM loading its runtime library only (unless already imported)."""
    if "tvm" not in sys.modules:
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    from forgeml.runtime.native import tvm_ffi

    tvm_ffi()  # imports tvm_ffi without dragging torch in
    from tvm.rpc import server

    return server


def device_info() -> dict[str, Any]:
    from forgeml.targets.host import detect_host

    host = detect_host()
    return {"arch": platform.machine(), "cpu": host.model, "cores": host.cores,
            "python": platform.python_version(), "platform": platform.platform()}


def serve(host: str = "127.0.0.1", port: int = 9090, port_end: int | None = None, tracker: str | None = None,
          key: str = "", silent: bool = False, announce: Callable[[str], None] = print, token: str | None = None,
          idle_timeout_s: float = 300.0, handshake_timeout_s: float = 10.0) -> None:
    """Serve TVM RPC sessions in this process until interrupted (forgeml.targets.rpc_server: token, confined
    work directory, timeouts); `token` defaults to $FORGEML_RPC_TOKEN and is required beyond loopback."""
    from forgeml.targets.rpc_server import DeviceServer, server_token

    tracker_addr = parse_address(tracker, "--tracker") if tracker else None
    if tracker_addr and not key:
        raise InvalidInput("--tracker needs --key: the name clients request this device by")
    token = server_token(host, token)
    if idle_timeout_s <= 0 or handshake_timeout_s <= 0:
        raise InvalidInput("--idle-timeout must be positive (seconds)")
    _import_rpc_server()
    import logging

    import tvm_ffi

    logging.basicConfig(level=logging.ERROR if silent else logging.INFO, format="%(asctime)s %(message)s")
    info = json.dumps(device_info())
    tvm_ffi.register_global_func(DEVICE_INFO, lambda: info, override=True)
    try:
        server = DeviceServer(host, port, port_end or port + 1, key, token, tracker_addr,
                              handshake_timeout_s=handshake_timeout_s, idle_timeout_s=idle_timeout_s)
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot serve TVM RPC on {host}:{port}: {e}") from None
    where = f", registering with tracker {tracker} as '{key}'" if tracker_addr else ""
    guard = "token required" if token else "no token: loopback only"
    try:
        announce(f"{_READY} {host}:{server.port} ({platform.machine()}){where}; {guard}, idle timeout "
                 f"{idle_timeout_s:g} s")
        server.serve_forever()
    except KeyboardInterrupt:
        sys.stdout.flush()
        os._exit(130)


class EmulatedServer:
    """A TVM RPC server running on an emulated device (qemu), in a subprocess."""

    def __init__(self, arch: str, host: str = "127.0.0.1", port: int = 9090, port_end: int | None = None,
                 tracker: str | None = None, key: str = "", start_timeout_s: float = 180,
                 progress: Callable[[str], None] | None = None, output: Any = subprocess.PIPE,
                 token: str | None = None, idle_timeout_s: float = 300.0):
        from forgeml.targets.emulate import copy_forgeml, prepare
        from forgeml.targets.rpc_server import TOKEN_ENV, server_token

        device = prepare(arch, progress)
        self._tmp = Path(tempfile.mkdtemp(prefix="forgeml-rpc-"))
        copy_forgeml(self._tmp)
        args = ["-m", "forgeml.targets.rpc", "--host", host, "--port", str(port),
                "--port-end", str(port_end or port + 1), "--key", key, "--idle-timeout", str(idle_timeout_s)]
        token = server_token(host, token)  # refused here, before qemu starts, when missing beyond loopback
        if tracker:
            args += ["--tracker", tracker]
        if progress:
            progress(f"starting the RPC server under {device.emulator.qemu}")
        env = device.environ(self._tmp, {TOKEN_ENV: token} if token else None)
        if not token:
            env.pop(TOKEN_ENV, None)
        self.proc = subprocess.Popen(device.command(*args), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=self._tmp, start_new_session=True)
        self.host, self.port, self.log = host, port, []
        deadline = time.monotonic() + start_timeout_s
        line = ""
        while time.monotonic() < deadline:  # the server prints its address once it listens
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.log.append(line.rstrip())
            if line.startswith(_READY):
                self.port = int(line.split()[5].rsplit(":", 1)[1])  # "forgeml: serving TVM RPC on HOST:PORT"
                break
        else:
            self.stop()
            raise ForgeError(f"the emulated {arch} RPC server did not start within {start_timeout_s:g} s")
        if not line.startswith(_READY):
            self.stop()
            raise ForgeError(f"the emulated {arch} RPC server failed: {(self.log or ['no output'])[-1]}")
        # keep draining its log so the pipe never fills
        self._drain = threading.Thread(target=self._pump, args=(output,), daemon=True)
        self._drain.start()

    def _pump(self, output: Any) -> None:
        for line in self.proc.stdout:
            if output is not subprocess.PIPE and output is not None:
                output.write(line)
                output.flush()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> None:
        """End the server and the session processes it forked (its own process group)."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> EmulatedServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# host side


def _tracker_request(host: str, port: int, key: str) -> tuple[str, int, str]:
    """(address, port, match key) of a device of kind `key`, from a TVM RPC tracker."""
    import struct

    from tvm.rpc import base

    sock = base.connect_with_retry((host, port), timeout=30)
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise InvalidInput(f"{host}:{port} is not a TVM RPC tracker")
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
        value = base.recvjson(sock)
    finally:
        sock.close()
    if value[0] != base.TrackerCode.SUCCESS:
        raise InvalidInput(f"the tracker at {host}:{port} answered {value!r} for device key '{key}'")
    url, device_port, matchkey = value[1]
    return url, int(device_port), matchkey


def connect(rpc: str | None = None, tracker: str | None = None, key: str | None = None, timeout_s: int = 900,
            token: str | None = None):
    """An RPC session: to the server at `rpc`, or to a device of kind `key` from the `tracker`; `token`
    (default $FORGEML_RPC_TOKEN) is the device server's (`forgeml device serve`)."""
    from tvm import rpc as tvm_rpc

    from forgeml.targets.rpc_server import TOKEN_ENV, client_key

    token = token or os.environ.get(TOKEN_ENV) or None
    try:
        if rpc:
            host, port = parse_address(rpc, "--rpc")
            return tvm_rpc.connect(host, port, client_key("", token), session_timeout=timeout_s)
        if tracker:
            if not key:
                raise InvalidInput("--tracker needs --device-key: the key the device registered with")
            host, port = parse_address(tracker, "--tracker")
            url, device_port, matchkey = _tracker_request(host, port, key)
            return tvm_rpc.connect(url, device_port, client_key(matchkey, token), session_timeout=timeout_s)
    except ForgeError:
        raise
    except Exception as e:  # TVM raises RuntimeError/TVMError with multi-line messages
        where = rpc or f"{tracker} (key {key})"
        reason = _one_line(e)
        if "matches key" in reason:  # the server's answer to a wrong key or token
            reason = (f"the device refused the key or token ({'a token was given' if token else 'no token given'}; "
                      f"set {TOKEN_ENV} to the server's)")
        raise InvalidInput(f"cannot reach the RPC device at {where}: {reason}") from None
    raise InvalidInput("give --rpc HOST:PORT or --tracker HOST:PORT --device-key K")


def remote_info(remote) -> dict[str, Any] | None:
    """The device's architecture etc. when its server is forgeml's, else None (a stock TVM server)."""
    try:
        return json.loads(remote.get_function(DEVICE_INFO)())
    except Exception:
        return None


class RemoteArtifact:
    """An artifact loaded on an RPC device: its library uploaded, its weights copied as tensors."""

    def __init__(self, remote, path: str | Path, threads: int | None = None):
        import numpy as np
        import tvm
        from tvm.runtime.vm import VirtualMachine

        from forgeml.runtime.artifact import open_artifact

        self.path = Path(path)
        artifact = open_artifact(self.path)
        artifact.verify_checksums()
        self.manifest = artifact.manifest
        if self.manifest.target.get("device", "cpu") != "cpu":
            raise InvalidInput(f"{self.path.name}: remote benchmarks support CPU artifacts only")
        self.remote, self.dev = remote, remote.cpu()
        name = f"forgeml_{artifact.manifest.members.get(self.manifest.library, 'model')[:16]}.so"
        with tempfile.TemporaryDirectory(prefix="forgeml-upload-") as tmp:
            lib = Path(tmp) / name
            lib.write_bytes(artifact.read_member(self.manifest.library))
            remote.upload(str(lib), name)
        if threads:
            remote.get_function("runtime.config_threadpool")(1, int(threads))
        self.vm = VirtualMachine(remote.load_module(name), self.dev)
        self.weights = [tvm.runtime.tensor(np.ascontiguousarray(w), self.dev) for w in artifact.read_weights()]
        self._tvm = tvm

    def _set_inputs(self, feeds: dict[str, Any]) -> None:
        args = [self._tvm.runtime.tensor(feeds[s.name], self.dev) for s in self.manifest.inputs]
        self.vm.set_input("main", *args, *self.weights)

    def _outputs(self) -> dict[str, Any]:
        out = self.vm.get_outputs("main")
        tensors = list(out) if isinstance(out, (list, tuple)) else [out]
        return {spec.name: t.numpy() for spec, t in zip(self.manifest.outputs, tensors)}

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self._set_inputs(feeds)
        self.vm.invoke_stateful("main")
        return self._outputs()

    def time(self, feeds: dict[str, Any], warmup: int = 10, repeat: int = 100, budget_s: float = 60.0,
             ) -> tuple[list[float], dict[str, Any], int]:
        """(per-run seconds measured on the device, outputs, warm-up runs); runs cut to about budget_s."""
        self._set_inputs(feeds)
        start = time.perf_counter()
        self.vm.invoke_stateful("main")
        first = max(time.perf_counter() - start, 1e-6)  # includes the round trip: an upper bound
        warm = min(warmup, int(0.2 * budget_s / first))
        for _ in range(max(warm - 1, 0)):
            self.vm.invoke_stateful("main")
        runs = min(repeat, max(min(3, repeat), int(budget_s / first)))
        timer = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=runs, min_repeat_ms=0)
        samples = list(timer("main").results)  # time_evaluator runs once more first, untimed
        return samples, self._outputs(), warm


def remote_case(remote, info: dict[str, Any] | None, where: str, path: Path, feeds: dict[str, Any],
                model_key: str, threads: int, warmup: int, repeat: int, expected: dict[str, Any] | None = None,
                budget_s: float = 60.0):
    """A benchmark CaseResult for an artifact timed on an RPC device."""
    from forgeml.bench.harness import CaseResult, Stats
    from forgeml.compiler.verify import compare

    try:
        loaded = RemoteArtifact(remote, path, threads=threads)
    except ForgeError:
        raise
    except Exception as e:  # e.g. a library for another architecture on a stock TVM server
        from forgeml.runtime.artifact import open_artifact

        arch = open_artifact(path).manifest.target.get("arch")
        raise InvalidInput(f"{path.name} ({arch}) failed to load on the RPC device at {where}; is the device "
                           f"{arch}? {_one_line(e)}") from None
    samples, outputs, warm = loaded.time(feeds, warmup=warmup, repeat=repeat, budget_s=budget_s)
    extra: dict[str, Any] = {"reference": False, "path": str(path), "placement": "rpc", "rpc": where,
                             "device": info, "device_arch": (info or {}).get("arch"), "runs": len(samples),
                             "warmup": warm, "timer": "tvm time_evaluator on the device"}
    if expected is not None:
        extra["max_abs_error"], extra["max_rel_error"] = compare(outputs, expected)
    arch = (info or {}).get("arch") or loaded.manifest.target.get("arch")
    return CaseResult(
        name=f"forgeml {path.name} ({loaded.manifest.target.get('name')}, rpc {arch})", engine="forgeml",
        model=model_key, stats=Stats.of(samples), samples_ms=[t * 1e3 for t in samples], peak_rss_mb=None,
        artifact_mb=path.stat().st_size / 1e6, extra=extra)


def main(argv: list[str] | None = None) -> int:
    """`python -m forgeml.targets.rpc`: the device server without the CLI's dependencies (click, rich)."""
    parser = argparse.ArgumentParser(prog="python -m forgeml.targets.rpc", description=serve.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--port-end", type=int)
    parser.add_argument("--tracker", help="HOST:PORT of a TVM RPC tracker to register with")
    parser.add_argument("--key", default="", help="device key to register with the tracker")
    parser.add_argument("--token-file", help="file holding the token clients must give (or $FORGEML_RPC_TOKEN)")
    parser.add_argument("--idle-timeout", type=float, default=300.0, help="close a session silent this long (s)")
    args = parser.parse_args(argv)
    try:
        from forgeml.targets.rpc_server import read_token_file

        token = read_token_file(args.token_file) if args.token_file else None
        serve(args.host, args.port, args.port_end, args.tracker, args.key, token=token,
              idle_timeout_s=args.idle_timeout, announce=lambda msg: print(msg, flush=True))
    except ForgeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
