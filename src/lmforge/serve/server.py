"""Run the application with uvicorn, in the foreground or on a background thread.

Both bind the listening socket themselves, so port 0 picks a free port and the
real address is known (and logged) before the first request.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time

from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """Return a listening TCP socket on `host:port` (port 0: a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise LmforgeError(
                f"cannot listen on {host}:{port}: the address is already in use",
                hint="pass --port with a free port (0 picks one) or stop the other server",
            ) from exc
        raise LmforgeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="check --host and --port") from exc
    sock.set_inheritable(True)
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(app, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    """Serve `app` until interrupted.

    On Ctrl-C or SIGTERM uvicorn finishes open responses (at most 5 s), runs the
    application's shutdown, then re-raises the signal, so the exit status reports it.
    """
    import uvicorn

    if not _is_loopback(host):
        logger.warning(
            "Listening on %s: the server is reachable from other machines%s",
            host,
            "" if api_key else "; set --api-key to require a key",
        )
    sock = bind_socket(host, port)
    url = base_url(sock)
    logger.info("Serving on %s/v1 (health check: %s/health)", url, url)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """A uvicorn server on a daemon thread, for tests and notebooks.

    `with BackgroundServer(app) as server:` starts it on a free loopback port and
    waits until it accepts connections; `server.url` is its base URL. Leaving the
    block stops it.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0):
        self.app = app
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.url: str | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> "BackgroundServer":
        import uvicorn

        self._sock = bind_socket(self.host, self.port)
        self.url = base_url(self._sock)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()

        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server thread for {self.url} exited during startup")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server on {self.url} did not start within {self.startup_timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
