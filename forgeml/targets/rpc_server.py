"""forgeml's TVM RPC device server: TVM's session loop behind a token, a work directory, and timeouts.

TVM's stock listener (`tvm.rpc.server`) takes the device key as its only check (a name, sent in the
clear, echoed to anyone who asks the tracker), serves one client at a time from its accept loop (a
connection that never finishes the handshake blocks every other client), and resolves file names
by joining them to the session's directory (`../x` and `/x` reach anywhere). Here:

- a client must present the server's token (`-forgeml-token=...` after the key, where TVM carries
  its own options, so TVM's own client sends it unchanged and a stock TVM server ignores it),
  compared in constant time; a bind beyond loopback refuses to start without one;
- every connection's handshake runs in a thread of its own with a deadline, each session in a
  process of its own with its own work directory, and a session whose client stays silent longer
  than the idle timeout is closed (SO_RCVTIMEO on the session socket: TVM's C++ loop then ends);
- upload, download, remove and load_module resolve names inside the session's work directory and
  refuse any other (`..`, absolute paths, symlinks out).

Only standard-library imports at module level: this module is also copied into emulated devices.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

from forgeml.errors import InvalidInput

TOKEN_ENV = "FORGEML_RPC_TOKEN"
TOKEN_OPTION = "-forgeml-token="
IDLE_EXIT = 75  # a session process's exit status when its client went silent
log = logging.getLogger("forgeml.rpc")


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(host: str, token: str | None) -> str | None:
    """The token the server requires: given, else $FORGEML_RPC_TOKEN; required beyond loopback."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and (len(token) < 16 or any(c.isspace() for c in token)):
        raise InvalidInput("the RPC token must be at least 16 characters without spaces "
                           "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if token is None and not is_loopback(host):
        raise InvalidInput(f"serving on {host} (beyond loopback) needs a token: set {TOKEN_ENV} or give "
                           "--token-file (clients give the same)")
    return token


def read_token_file(path: str | Path) -> str:
    """The token in a file (its first line, stripped)."""
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise InvalidInput(f"cannot read the RPC token file {path}: {e.strerror}") from None
    if not text:
        raise InvalidInput(f"the RPC token file {path} is empty")
    return text.splitlines()[0].strip()


def client_key(key: str, token: str | None) -> str:
    """The key a client sends: the device key, then the token as an option."""
    return f"{key} {TOKEN_OPTION}{token}" if token else key


def confine(workdir: Path, name: str) -> Path:
    """`name` resolved inside `workdir`; ValueError for anything that leaves it."""
    root = workdir.resolve()
    path = (root / name).resolve()
    if name.startswith("/") or (path != root and root not in path.parents):
        raise ValueError(f"'{name}' is outside the session's work directory (names are relative to it)")
    return path


def check_handshake(words: list[str], expected_key: str, token: str | None) -> tuple[bool, dict[str, Any]]:
    """(accepted, options) for a client's key words ("client:KEY", then options)."""
    if not words or not hmac.compare_digest(words[0].encode(), f"client:{expected_key}".encode()):
        return False, {}
    given = [w[len(TOKEN_OPTION):] for w in words[1:] if w.startswith(TOKEN_OPTION)]
    if token is not None and not (len(given) == 1 and hmac.compare_digest(given[0].encode(), token.encode())):
        return False, {}
    opts: dict[str, Any] = {}
    for w in words[1:]:
        if w.startswith("-timeout="):
            try:
                opts["timeout"] = float(w[len("-timeout="):])
            except ValueError:
                return False, {}
    return True, opts


def _register_session_env(workdir: Path) -> None:
    """The Python half of TVM's server environment, confined to `workdir` (in the session process)."""
    import tvm_ffi
    from tvm.runtime.module import load_module

    def workpath(name: str) -> str:
        return str(confine(workdir, name))

    def refuse_linking(name: str):
        raise RuntimeError("forgeml's device server does not link modules on the device (upload a .so)")

    tvm_ffi.register_global_func("tvm.rpc.server.workpath", workpath, override=True)
    tvm_ffi.register_global_func("tvm.rpc.server.load_module", lambda name: load_module(workpath(name)),
                                 override=True)
    tvm_ffi.register_global_func("tvm.rpc.server.download_linked_module", refuse_linking, override=True)


def _session_main(sock: socket.socket, workdir: str) -> None:
    """A session process: TVM's C++ loop over the socket, from inside the work directory."""
    from tvm.rpc import _ffi_api

    os.chdir(workdir)
    _register_session_env(Path(workdir))
    try:
        _ffi_api.ServerLoop(sock.fileno())
    except Exception as e:  # the idle deadline (EAGAIN) or a client gone mid-call: one line, not a traceback
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        idle = "temporarily unavailable" in reason
        log.warning("session closed: %s", "client idle past the timeout" if idle else reason)
        os._exit(IDLE_EXIT if idle else 1)


class DeviceServer:
    """Listens on host:port; each accepted client gets a session process (see the module's docstring)."""

    def __init__(self, host: str, port: int, port_end: int, key: str, token: str | None,
                 tracker_addr: tuple[str, int] | None = None, handshake_timeout_s: float = 10.0,
                 idle_timeout_s: float = 300.0):
        self.host, self.key, self.token, self.tracker_addr = host, key, token, tracker_addr
        self.handshake_timeout_s, self.idle_timeout_s = handshake_timeout_s, idle_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.port = None
        for candidate in range(port, max(port_end, port + 1)):
            try:
                self.sock.bind((host, candidate))
            except OSError as e:
                if e.errno == 98:  # EADDRINUSE: try the next port
                    continue
                self.sock.close()
                raise
            self.port = candidate
            break
        if self.port is None:
            self.sock.close()
            raise ValueError(f"no free port in [{port}, {port_end})")
        self.sock.listen(16)
        self._matchkey = key
        self._matched = threading.Event()

    # -- one connection -----------------------------------------------------------------------
    def _handshake(self, conn: socket.socket, addr: Any) -> None:
        from tvm.rpc import base

        try:
            conn.settimeout(self.handshake_timeout_s)
            magic = struct.unpack("<i", base.recvall(conn, 4))[0]
            if magic != base.RPC_MAGIC:
                conn.close()
                return
            size = struct.unpack("<i", base.recvall(conn, 4))[0]
            if not 0 < size <= 4096:
                conn.close()
                return
            words = base.recvall(conn, size).decode("utf-8", "replace").split()
            accepted, opts = check_handshake(words, self._matchkey, self.token)
            if not accepted:
                log.warning("refused %s: wrong key or token", addr)
                conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
                conn.close()
                return
            server_key = f"server:{self.key}".encode()
            conn.sendall(struct.pack("<i", base.RPC_CODE_SUCCESS) + struct.pack("<i", len(server_key)) + server_key)
        except (OSError, struct.error) as e:  # includes the handshake deadline (socket.timeout)
            log.warning("dropped %s during the handshake: %s", addr, e)
            conn.close()
            return
        if self.tracker_addr:
            self._matched.set()
        self._session(conn, addr, opts)

    def _session(self, conn: socket.socket, addr: Any, opts: dict[str, Any]) -> None:
        import multiprocessing

        conn.settimeout(None)  # blocking again (TVM's loop reads the descriptor itself) ...
        # ... and a receive deadline: a client silent for this long ends the session
        secs = max(int(self.idle_timeout_s), 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", secs, 0))
        workdir = tempfile.mkdtemp(prefix="forgeml-rpc-session-")
        log.info("session for %s in %s", addr, workdir)
        proc = multiprocessing.get_context("fork").Process(target=_session_main, args=(conn, workdir), daemon=True)
        try:
            proc.start()
            proc.join(opts.get("timeout"))
            if proc.is_alive():  # the client's own session timeout
                log.info("session for %s reached its %s s timeout", addr, opts["timeout"])
                proc.kill()
                proc.join()
        finally:
            conn.close()
            shutil.rmtree(workdir, ignore_errors=True)
        why = "idle timeout" if proc.exitcode == IDLE_EXIT else f"exit {proc.exitcode}"
        log.info("session for %s ended (%s)", addr, why)

    # -- the listener ---------------------------------------------------------------------------
    def _tracker_connect(self):
        from tvm.rpc import base
        from tvm.rpc.base import TrackerCode

        conn = base.connect_with_retry(self.tracker_addr)
        conn.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(conn, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise InvalidInput(f"{self.tracker_addr} is not a TVM RPC tracker")
        base.sendjson(conn, [TrackerCode.UPDATE_INFO, {"key": f"server:{self.key}", "addr": (None, self.port)}])
        assert base.recvjson(conn) == TrackerCode.SUCCESS
        return conn

    def _tracker_put(self, conn, used: set[str]) -> None:
        """Offer this device to the tracker's clients under a fresh match key."""
        from tvm.rpc import base
        from tvm.rpc.base import TrackerCode

        self._matchkey = base.random_key(self.key, cmap=used)
        used.add(self._matchkey)
        base.sendjson(conn, [TrackerCode.PUT, self.key, (self.port, self._matchkey), None])
        assert base.recvjson(conn) == TrackerCode.SUCCESS

    def serve_forever(self, ping_period_s: float = 2.0) -> None:
        from tvm.rpc import base
        from tvm.rpc.base import TrackerCode

        tracker, used, unmatched = None, set(), 0
        while True:
            try:
                if self.tracker_addr and tracker is None:
                    tracker = self._tracker_connect()
                    self._tracker_put(tracker, used)
                ready, _, _ = select.select([self.sock], [], [], ping_period_s)
                if tracker is not None:
                    if self._matched.is_set():  # handed out and used: offer the device again
                        self._matched.clear()
                        self._tracker_put(tracker, used)
                    elif not ready:  # TVM's rule: a key handed out but not used for a while is renewed
                        base.sendjson(tracker, [TrackerCode.GET_PENDING_MATCHKEYS])
                        unmatched = 0 if self._matchkey in base.recvjson(tracker) else unmatched + 1
                        if unmatched * ping_period_s > 4 + ping_period_s:
                            self._tracker_put(tracker, used)
                            unmatched = 0
                if not ready:
                    continue
                conn, addr = self.sock.accept()
            except OSError:
                if tracker is not None:  # the tracker went away: reconnect
                    tracker.close()
                    tracker = None
                continue
            threading.Thread(target=self._handshake, args=(conn, addr), daemon=True).start()
