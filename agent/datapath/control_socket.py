"""Local control socket: newline-delimited JSON over a UNIX stream socket.

Requests are one JSON object per line, e.g. ``{"cmd": "status"}``; each gets
one JSON line back: the handler's dict, or ``{"error": "..."}`` for
malformed JSON, a non-object or an unknown command. Non-blocking: the
server is registered in the runtime's selector and never blocks the
packet loop (a client that does not read its answers is disconnected once
its output exceeds ``MAX_OUT`` bytes).
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
from typing import Callable

DEFAULT_PATH = "/run/meshsec/agent.sock"
MAX_LINE = 64 * 1024
MAX_OUT = 16 * 1024 * 1024


class ControlSocketError(Exception):
    """The socket cannot be created (path in use by a live agent, permissions)."""


class _Conn:
    __slots__ = ("sock", "inbuf", "outbuf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = bytearray()


class ControlServer:
    """Serves ``handlers`` (cmd name -> callable(request dict) -> dict) on ``path`` (mode 0600)."""

    def __init__(self, path: str, handlers: dict[str, Callable[[dict], dict]],
                 logger: logging.Logger | None = None) -> None:
        self.path = path
        self.handlers = handlers
        self.log = logger or logging.getLogger("meshsec.control")
        self.counters = {"requests": 0, "bad_requests": 0}
        self._sel: selectors.BaseSelector | None = None
        self._conns: dict[int, _Conn] = {}
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ControlSocketError(f"cannot create {parent}, the directory of the control socket {path} "
                                     f"({exc.strerror}); pass --control-socket PATH in a directory that exists "
                                     "or can be created") from None
        if len(os.fsencode(path)) > 107:  # sun_path is 108 bytes with the terminating NUL
            raise ControlSocketError(f"control socket path {path!r} is longer than 107 bytes (UNIX socket "
                                     "limit); pass a shorter --control-socket")
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ControlSocketError(f"{path} exists and is not a socket; remove it or pass --control-socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise ControlSocketError(f"{path} is in use by another running agent; pass --control-socket")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale socket of a dead agent
            finally:
                probe.close()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: no window where others may connect
        try:
            self._sock.bind(path)
        except OSError as exc:
            self._sock.close()
            raise ControlSocketError(f"cannot bind control socket {path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._sock.setblocking(False)

    def register(self, sel: selectors.BaseSelector) -> None:
        self._sel = sel
        sel.register(self._sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self, _mask: int) -> None:
        while True:
            try:
                s, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.warning("control socket accept: %s", exc)
                return
            s.setblocking(False)
            c = _Conn(s)
            self._conns[s.fileno()] = c
            self._sel.register(s, selectors.EVENT_READ, lambda mask, c=c: self._on_conn(c, mask))

    def _on_conn(self, c: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return self._close(c)
            if data == b"":
                if not c.outbuf:
                    return self._close(c)
            elif data:
                c.inbuf += data
                while b"\n" in c.inbuf:
                    line, c.inbuf = c.inbuf.split(b"\n", 1)
                    if line.strip():
                        c.outbuf += self.handle_line(line) + b"\n"
                if len(c.inbuf) > MAX_LINE:
                    c.outbuf += json.dumps({"error": f"request longer than {MAX_LINE} bytes"}).encode() + b"\n"
                    c.inbuf = b""
                    self.counters["bad_requests"] += 1
        self._flush(c)

    def _flush(self, c: _Conn) -> None:
        if c.outbuf:
            try:
                n = c.sock.send(c.outbuf)
                del c.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return self._close(c)
            if len(c.outbuf) > MAX_OUT:
                return self._close(c)
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.outbuf else 0)
        try:
            if self._sel.get_key(c.sock).events != want:
                self._sel.modify(c.sock, want, lambda mask, c=c: self._on_conn(c, mask))
        except (KeyError, ValueError):
            pass

    def _close(self, c: _Conn) -> None:
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self._conns.pop(c.sock.fileno(), None)
        c.sock.close()

    def handle_line(self, line: bytes) -> bytes:
        """Answer one request line (without newline) with one JSON document (bytes)."""
        self.counters["requests"] += 1
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            self.counters["bad_requests"] += 1
            return json.dumps({"error": f"malformed JSON: {exc}"}).encode()
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            self.counters["bad_requests"] += 1
            return json.dumps({"error": 'expected an object like {"cmd": "status"}'}).encode()
        h = self.handlers.get(req["cmd"])
        if h is None:
            self.counters["bad_requests"] += 1
            return json.dumps({"error": f"unknown cmd {req['cmd']!r}; known: {', '.join(sorted(self.handlers))}"}).encode()
        try:
            return json.dumps(h(req), default=str).encode()
        except Exception as exc:  # a handler bug must not kill the packet loop
            self.log.exception("control command %s failed", req["cmd"])
            return json.dumps({"error": f"internal error: {exc}"}).encode()

    def close(self) -> None:
        for c in list(self._conns.values()):
            self._close(c)
        if self._sel is not None:
            try:
                self._sel.unregister(self._sock)
            except (KeyError, ValueError):
                pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
