"""``--address``: what it names, and whether anything answers there.

:func:`parse_address` splits ``auto``, ``HOST:PORT`` (a Ray head's GCS) and ``ray://HOST[:PORT]``
(a Ray client server; port :data:`RAY_CLIENT_PORT` when omitted), raising
:class:`~gradcomp.app.launch_cli.UsageError` for anything else. :func:`probe_address` resolves
the host and opens one TCP connection within a timeout in seconds, raising
:class:`ClusterUnreachable` with what to check when nothing accepts it. Nothing here imports Ray.

Example:
    >>> parse_address("10.0.0.5:6379")
    ('gcs', '10.0.0.5', 6379)
    >>> parse_address("ray://head")
    ('client', 'head', 10001)
    >>> parse_address("auto")
    ('auto', None, None)
"""

from __future__ import annotations

import errno
import socket
import threading
import time

from gradcomp.app.launch_cli import UsageError

RAY_CLIENT_PORT = 10001  # ray://host without a port


def parse_address(text: str) -> tuple[str, str | None, int | None]:
    """Split ``--address`` into (kind, host, port); kind is ``auto``, ``gcs`` or ``client`` (ray://).

    Raises :class:`UsageError` for anything that is none of ``auto``, ``HOST:PORT`` and
    ``ray://HOST[:PORT]``.
    """
    t = text.strip()
    if not t:
        raise UsageError("--address is empty")
    if t == "auto":
        return "auto", None, None
    kind, rest = "gcs", t
    if t.startswith("ray://"):
        kind, rest = "client", t[len("ray://"):].rstrip("/")
    elif "://" in t or "/" in t:
        raise UsageError(f"--address {text!r}: expected HOST:PORT (the head's GCS address, e.g. 10.0.0.5:6379), "
                         "'auto' or ray://HOST:PORT")
    host, sep, port_text = rest.rpartition(":")
    if not sep and kind == "client":
        host, port_text = rest, str(RAY_CLIENT_PORT)
    host = host.strip("[]")  # [::1]:6379
    if not sep and kind == "gcs" or not host or any(c.isspace() for c in host):
        raise UsageError(f"--address {text!r}: expected HOST:PORT (the head's GCS address, e.g. 10.0.0.5:6379), "
                         "'auto' or ray://HOST:PORT")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"--address {text!r}: the port must be a number in 1..65535, got {port_text!r}")
    return kind, host, int(port_text)


class ClusterUnreachable(RuntimeError):
    """Nothing usable answers at ``--address`` (exit 1, before Ray is touched)."""


def _resolve(host: str, port: int, timeout: float) -> list:
    """``socket.getaddrinfo`` for a TCP connection, bounded by ``timeout`` seconds (it runs in a
    daemon thread: a stuck resolver cannot be interrupted); :class:`ClusterUnreachable` otherwise."""
    found: list = []
    error: list = []

    def work():
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            error.append(e)

    t = threading.Thread(target=work, daemon=True, name="gradcomp-resolve")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise ClusterUnreachable(f"cannot resolve {host!r} within {timeout:g} s")
    if error:
        raise ClusterUnreachable(f"cannot resolve {host!r}: {error[0]}")
    return found


def probe_address(address: str, timeout: float) -> None:
    """Fail fast (:class:`ClusterUnreachable`) if nothing accepts a TCP connection at ``address``.

    ``ray.init`` would retry "Failed to connect to GCS" for minutes; a plain socket connect says
    within ``timeout`` seconds whether anything listens there. ``auto`` is left to Ray.
    """
    kind, host, port = parse_address(address)
    if kind == "auto" or host is None or port is None:  # "auto": no host or port, left to Ray
        return
    what = "Ray client server" if kind == "client" else "Ray GCS"
    default = (f"{RAY_CLIENT_PORT} for ray://" if kind == "client"
               else "6379 unless `ray start --head --port` said otherwise")
    hint = (f"check that the Ray head runs there (`ray status --address {host}:{port}` on the head), that "
            f"{port} is its {what} port ({default}), and that no firewall drops the connection")
    deadline = time.monotonic() + timeout
    try:
        infos = _resolve(host, port, timeout)
    except ClusterUnreachable as e:
        raise ClusterUnreachable(f"--address {address}: {e}; {hint}") from None
    last = None
    for family, kind_, proto, _, sockaddr in infos:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with socket.socket(family, kind_, proto) as s:
            s.settimeout(left)
            try:
                s.connect(sockaddr)
                return
            except TimeoutError:
                last = f"no answer within {timeout:g} s"
            except OSError as e:
                last = ("connection refused, nothing listens there" if e.errno == errno.ECONNREFUSED
                        else str(e.strerror or e))
    raise ClusterUnreachable(f"--address {address}: cannot reach the {what} at {host}:{port} "
                             f"({last or f'no answer within {timeout:g} s'}); {hint}")
