"""What the ``meshsec`` subcommands share (meshsec.cli, meshsec.cli_mesh): the error
type, one request over a control socket (newline-delimited JSON), and the table, age
and size formatting of their output."""
from __future__ import annotations

import json
import os
import socket
import stat

DEFAULT_SOCKET = "/run/meshsec/agent.sock"


class CliError(Exception):
    pass


def _not_a_socket(path: str) -> str | None:
    """What ``path`` is when it exists but is not a UNIX socket (None otherwise)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    return "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "not a socket"


def request(path: str, req: dict, timeout: float = 5.0, who: str = "meshsec-agent") -> dict:
    """Send one request, return the decoded answer. CliError with a hint on failure
    (``who``: the program expected behind the socket)."""
    what = _not_a_socket(path)
    if what is not None:
        if who != "meshsec-agent":
            raise CliError(f"{path} is not a socket ({what}); pass {who}'s socket with --socket")
        raise CliError(f"{path} is not a socket ({what}); pass the agent's control socket with --socket "
                       f"(meshsec-agent --control-socket, default {DEFAULT_SOCKET})")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise CliError(f"cannot connect to {path}: {exc.strerror}; is {who} running? pass --socket")
        except PermissionError:
            raise CliError(f"permission denied on {path}: the socket is mode 0600, run as {who}'s user (root)")
        except OSError as exc:
            raise CliError(f"cannot connect to {path}: {exc}")
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            try:
                chunk = s.recv(1 << 16)
            except socket.timeout:
                raise CliError(f"no answer from {path} within {timeout:.0f}s")
            if not chunk:
                raise CliError(f"{path} closed the connection without an answer")
            buf += chunk
    finally:
        s.close()
    try:
        ans = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as exc:
        raise CliError(f"unreadable answer from {path}: {exc}")
    if isinstance(ans, dict) and "error" in ans:
        raise CliError(f"{'agent' if who == 'meshsec-agent' else who}: {ans['error']}")
    return ans


def _age(s) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "-"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"


def _size(n) -> str:
    n = int(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
