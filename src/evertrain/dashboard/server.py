"""Run the dashboard: in this process (:func:`serve`) or as a child (:func:`start_ui_process`)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from evertrain.dashboard.auth import TOKEN_FILE, TokenError, is_loopback, load_or_create_token
from evertrain.dashboard.inbox import DEFAULT_MAX_UPLOAD_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class DashboardError(Exception):
    """The dashboard cannot start (no such run directory, port taken, bad token file)."""


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one.

    Raises:
        DashboardError: the address is in use or cannot be bound (message says which).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        raise DashboardError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port, "
            "or stop what uses it"
        ) from e
    return sock


def serve(
    run_dir: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    out: TextIO | None = None,
    compare: list[Path] | None = None,
) -> None:
    """Serve the dashboard of ``run_dir`` on ``host:port`` until interrupted (SIGINT/SIGTERM).

    Creates ``RUN/ui-token`` (mode 0600) on first use and prints it once, then prints the
    URL (``evertrain ui: serving RUN at http://HOST:PORT/``) to ``out`` (default stdout).
    ``compare``: more runs for the compare chart (see :func:`create_app`).

    Raises:
        DashboardError: ``run_dir`` is not a directory, the port cannot be bound, or the
            token file is unusable.
    """
    try:
        import uvicorn

        from evertrain.dashboard.app import create_app
    except ImportError as e:  # the web server is an optional extra
        raise DashboardError(
            f"the dashboard needs {e.name or 'starlette and uvicorn'}, which is not installed: "
            f"pip install 'evertrain[ui]'"
        ) from None

    out = out or sys.stdout
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DashboardError(
            f"{run_dir}: no such run directory (the directory given to `evertrain train "
            "--run-dir` or `evertrain watch`)"
        )
    for other in compare or []:
        if not Path(other).is_dir():
            raise DashboardError(f"--compare {other}: no such directory")
    loopback = is_loopback(host)
    try:
        token, created = load_or_create_token(run_dir)
    except TokenError as e:
        raise DashboardError(str(e)) from e
    sock = bind(host, port)
    port = sock.getsockname()[1]
    url = f"http://{_url_host(host)}:{port}/"
    if created:
        print(
            f"evertrain ui: new access token (shown only now; kept in {run_dir / TOKEN_FILE}, "
            f"mode 0600): {token}\nevertrain ui: open {url}?token={token} once to sign this "
            "browser in",
            file=out,
        )
    elif not loopback:
        print(
            f"evertrain ui: reachable from the network; every request needs the token in "
            f"{run_dir / TOKEN_FILE} (open {url}?token=<token> once)",
            file=out,
        )
    print(f"evertrain ui: serving {run_dir} at {url}", file=out, flush=True)
    app = create_app(
        run_dir,
        token=token,
        loopback=loopback,
        port=port,
        max_upload_bytes=max_upload_bytes,
        compare=[Path(p) for p in compare or []],
    )
    threading.Thread(target=_warm_up, args=(app,), daemon=True, name="warm-up").start()
    # access_log off: the page polls every 2 s, and a ?token= login link would be logged
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def _warm_up(app: Any) -> None:
    """Parse metrics.jsonl and import torch (checkpoint verification, data extensions) before
    the first page load asks: on a weeks-long run the first parse takes seconds."""
    import evertrain.checkpoint  # noqa: F401
    import evertrain.data.records  # noqa: F401

    app.state.run.metrics.refresh()


def start_ui_process(
    run_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **popen_kwargs: Any
) -> subprocess.Popen[Any]:
    """Start the dashboard for ``run_dir`` as a separate process (for ``evertrain watch --ui``).

    It shares nothing with the caller but the run directory, so a crash of either leaves the
    other running. It runs ``python -m evertrain.dashboard RUN --host HOST --port PORT``
    with the caller's interpreter, inherits stdout/stderr (its token and URL lines appear
    in the daemon's terminal) unless ``popen_kwargs`` says otherwise, and stops on SIGTERM
    (``proc.terminate()``) or SIGINT. Failing to start (port taken, ...) shows as the
    process exiting with status 2 and a message on its stderr.
    """
    cmd = [
        sys.executable,
        "-m",
        "evertrain.dashboard",
        str(run_dir),
        "--host",
        host,
        "--port",
        str(port),
    ]
    return subprocess.Popen(cmd, **popen_kwargs)


def main(argv: list[str] | None = None) -> int:
    """``python -m evertrain.dashboard RUN [--host H] [--port P] [--max-upload-mb N]
    [--compare DIR ...]``."""
    ap = argparse.ArgumentParser(prog="python -m evertrain.dashboard")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--host", default=DEFAULT_HOST)
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20)
    ap.add_argument("--compare", type=Path, action="append", default=[])
    a = ap.parse_args(argv)
    try:
        serve(a.run_dir, a.host, a.port, int(a.max_upload_mb * 2**20), compare=a.compare)
    except DashboardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
