"""The dashboard's Starlette application: the page, its JSON API and Prometheus metrics.

Endpoints (JSON unless said; errors are ``{"error": message}``):

- ``GET /``: the page. ``GET /static/...``: its scripts, styles and the vendored uPlot.
- ``GET /api/status``: status.json plus derived fields (see :meth:`RunDirectory.status`),
  the control record, inbox, queue, upload limit and accepted extensions.
- ``GET /api/files?limit=N``: the ledger (:meth:`RunDirectory.files`).
- ``GET /api/metrics?since_step=N&max_points=M``: metrics.jsonl records with
  ``global_step > N`` (:meth:`MetricsTail.query`), thinned to ``M`` train points
  (default ``metrics_tail.CHART_POINTS``); ``max_points=0`` is every point, and waits (up
  to :data:`EXACT_WAIT_SECONDS`) for a large file's history to be read exactly.
- ``GET /api/checkpoints``: ``{"checkpoints": [...], "snapshots": [...]}``.
- ``GET /api/config``: the stored run config of the newest checkpoint
  (:meth:`ConfigReader.read <evertrain.dashboard.runinfo.ConfigReader.read>`).
- ``GET /api/compare?max_points=M``: the training loss of every compared run, the
  dashboard's own first (:meth:`CompareRuns.query
  <evertrain.dashboard.compare.CompareRuns.query>`); ``{"runs": []}`` when there is
  nothing to compare.
- ``POST /api/checkpoints/{name}/verify``: full verification of one checkpoint.
- ``POST /api/pause``, ``POST /api/resume``, ``POST /api/snapshot``: write control.json.
- ``POST /api/inbox?name=NAME`` with the file's bytes as the body: upload (201).
- ``GET /metrics``: Prometheus text.

Access rules are in :mod:`evertrain.dashboard.auth`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from evertrain.dashboard import prometheus
from evertrain.dashboard.auth import host_is_loopback_name, token_matches
from evertrain.dashboard.compare import DEFAULT_MAX_POINTS, CompareRuns, compared_runs
from evertrain.dashboard.control import ControlError, update_control
from evertrain.dashboard.inbox import InboxUpload, UploadError, check_name, data_extensions
from evertrain.dashboard.metrics_tail import CHART_POINTS
from evertrain.dashboard.rundir import RunDirectory

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

EXACT_WAIT_SECONDS = 120.0  # max_points=0 waits this long for a large file's exact history
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_COOKIE_MAX_AGE = 30 * 24 * 3600  # seconds
_TOKEN_PLACEHOLDER = "__EVERTRAIN_TOKEN__"
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),  # no clickjacking of the action buttons
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
    ),
]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _json(data: Any, status: int = 200) -> Response:
    # allow_nan=False: a NaN that slipped through must fail here, not in the browser
    body = json.dumps(data, allow_nan=False, separators=(",", ":")).encode()
    return Response(
        body, status, media_type="application/json", headers={"cache-control": "no-store"}
    )


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"query parameter {name}={raw!r}: expected an integer") from None
    if not lo <= v <= hi:
        raise ValueError(f"query parameter {name}={v}: must be between {lo} and {hi}")
    return v


class _Access:
    """ASGI middleware enforcing :mod:`evertrain.dashboard.auth`'s rules."""

    def __init__(self, app: ASGIApp, token: str, loopback: bool, cookie_name: str) -> None:
        self.app, self.token, self.loopback, self.cookie = app, token, loopback, cookie_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer_send = send

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _SECURITY_HEADERS
            await outer_send(message)

        send = send_secured
        request = Request(scope)
        method = scope["method"]
        if self.loopback and not host_is_loopback_name(request.headers.get("host")):
            resp: Response = _error(
                403,
                f"Host {request.headers.get('host')!r} refused: this dashboard listens on "
                "loopback only; open it as http://127.0.0.1:PORT/ (or localhost)",
            )
            await resp(scope, receive, send)
            return
        auth = request.headers.get("authorization", "")
        header = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        header = header or request.headers.get("x-evertrain-token")
        query = request.query_params.get("token")
        cookie = request.cookies.get(self.cookie)
        header_ok = token_matches(header, self.token)
        if method not in _SAFE_METHODS:
            if not header_ok:
                resp = _error(
                    401 if header is None else 403,
                    f"{method} {scope['path']} changes the run and needs the dashboard token "
                    "in the header 'Authorization: Bearer <token>' (the token is in "
                    "RUN/ui-token)" + ("" if header is None else "; the token given is wrong"),
                )
                await resp(scope, receive, send)
                return
        else:
            query_ok = token_matches(query, self.token)
            if query is not None and not query_ok:
                resp = _error(403, "the token in ?token= is wrong (see RUN/ui-token)")
                await resp(scope, receive, send)
                return
            authed = header_ok or query_ok or token_matches(cookie, self.token)
            if query_ok and scope["path"] == "/":
                # swap the token in the URL for a cookie, so it leaves the address bar
                rest = [
                    (k, v) for k, v in parse_qsl(scope["query_string"].decode()) if k != "token"
                ]
                resp = RedirectResponse("/" + ("?" + urlencode(rest) if rest else ""), 303)
                resp.set_cookie(
                    self.cookie,
                    self.token,
                    max_age=_COOKIE_MAX_AGE,
                    path="/",
                    httponly=True,
                    samesite="strict",
                )
                await resp(scope, receive, send)
                return
            if not self.loopback and not authed:
                if scope["path"] == "/":
                    resp = HTMLResponse(_LOGIN_PAGE, 401)
                else:
                    resp = _error(
                        401,
                        "this dashboard is reachable from the network and needs its token: "
                        "header 'Authorization: Bearer <token>' (the token is in RUN/ui-token)",
                    )
                await resp(scope, receive, send)
                return
            scope.setdefault("state", {})["authed"] = authed
        if method not in _SAFE_METHODS:
            scope.setdefault("state", {})["authed"] = True

        await self.app(scope, receive, send)


_LOGIN_PAGE = """<!doctype html><meta charset="utf-8"><title>evertrain: token needed</title>
<body style="font-family:sans-serif;max-width:40em;margin:3em auto">
<h1>Access token needed</h1>
<p>This dashboard is reachable from the network, so every page needs its access token.
The token is in the file <code>ui-token</code> of the run directory (readable by its owner
only). Open <code>http://HOST:PORT/?token=&lt;token&gt;</code> once; the browser keeps it
in a cookie for 30 days.</p></body>"""


def create_app(
    run_dir: Path,
    *,
    token: str,
    loopback: bool,
    port: int,
    max_upload_bytes: int,
    compare: list[Path] | None = None,
) -> Starlette:
    """The dashboard for ``run_dir``.

    Args:
        run_dir: the run directory (read; the app writes only control.json and inbox/).
        token: the access token (:func:`~evertrain.dashboard.auth.load_or_create_token`).
        loopback: whether the server is bound to a loopback address (see auth rules).
        port: the port served on; names the token cookie, since browsers share cookies
            between ports of one host.
        max_upload_bytes: uploads larger than this are refused with 413.
        compare: more run directories (or parents of run directories) whose loss curves
            are shown with this run's (:func:`~evertrain.dashboard.compare.compared_runs`;
            a ``run_dir`` that is itself a parent of runs compares its runs).
    """
    run = RunDirectory(run_dir)
    runs = compared_runs(run.root, compare or [])
    comparison = CompareRuns(runs, {run.root: run.metrics}) if len(runs) > 1 else None
    static = Path(__file__).parent / "static"
    index_html = (static / "index.html").read_text(encoding="utf-8")
    cookie_name = f"evertrain_token_{port}"
    extensions: list[tuple[str, ...]] = []  # filled on first use: importing data loads torch

    def exts() -> tuple[str, ...]:
        if not extensions:
            extensions.append(data_extensions())
        return extensions[0]

    def page(request: Request) -> Response:
        known = request.scope.get("state", {}).get("authed", False)
        html = index_html.replace(_TOKEN_PLACEHOLDER, token if known else "")
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    def api_status(request: Request) -> Response:
        run.metrics.refresh()
        data = run.status()
        data.update(
            run_dir=str(run.root),
            server_time=time.time(),
            last_train=run.metrics.last_train(),
            max_upload_bytes=max_upload_bytes,
            upload_extensions=list(exts()),
        )
        return _json(data)

    def api_files(request: Request) -> Response:
        try:
            limit = _int_param(request, "limit", 1000, 0, 1_000_000)
        except ValueError as e:
            return _error(400, str(e))
        return _json(run.files(limit))

    def api_metrics(request: Request) -> Response:
        try:
            since = _int_param(request, "since_step", -1, -1, 2**62)
            max_points = _int_param(request, "max_points", CHART_POINTS, 0, 10_000_000)
        except ValueError as e:
            return _error(400, str(e))
        run.metrics.refresh()
        if max_points == 0:  # every point: not a sketch of the history
            run.metrics.wait_complete(EXACT_WAIT_SECONDS)
        return _json(run.metrics.query(since, max_points))

    def api_checkpoints(request: Request) -> Response:
        return _json({"checkpoints": run.checkpoints(), "snapshots": run.snapshots()})

    def api_config(request: Request) -> Response:
        return _json(run.config.read())

    def api_compare(request: Request) -> Response:
        try:
            max_points = _int_param(request, "max_points", DEFAULT_MAX_POINTS, 0, 10_000_000)
        except ValueError as e:
            return _error(400, str(e))
        return _json(comparison.query(max_points) if comparison else {"runs": []})

    def api_verify(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            result = run.verify(name)
        except FileNotFoundError as e:
            return _error(404, str(e))
        return _json({"name": name, **result})

    def control(**changes: Any) -> Response:
        try:
            return _json({"control": update_control(run.root, **changes)})
        except ControlError as e:
            return _error(500, str(e))

    def api_pause(request: Request) -> Response:
        return control(paused=True)

    def api_resume(request: Request) -> Response:
        return control(paused=False)

    def api_snapshot(request: Request) -> Response:
        return control(snapshot_requested=time.time())

    async def api_inbox(request: Request) -> Response:
        name = request.query_params.get("name")
        if name is None:
            return _error(400, "upload refused: give the file name as ?name=NAME")
        length = request.headers.get("content-length")
        try:
            expected = int(length) if length is not None else None
        except ValueError:
            return _error(400, f"bad Content-Length header {length!r}")
        try:
            ok_exts = await run_in_threadpool(exts)
            name = check_name(name, ok_exts)
            upload = InboxUpload(run.root / "inbox", name, max_upload_bytes, expected)
        except UploadError as e:
            return _error(e.status, str(e))
        try:
            async for chunk in request.stream():
                upload.write(chunk)
            path = upload.commit()
        except UploadError as e:
            upload.abort()
            return _error(e.status, str(e))
        except FileExistsError:
            return _error(409, f"upload refused: {name!r} appeared in the inbox meanwhile")
        except BaseException:
            upload.abort()  # client went away, disk full, ...: leave no .part behind
            raise
        return _json({"name": name, "path": str(path), "size_bytes": upload.size}, 201)

    def metrics_text(request: Request) -> Response:
        run.metrics.refresh()
        st = run.status()
        status = st["status"]
        last_ckpt = None
        lc = (status or {}).get("last_checkpoint")
        if isinstance(lc, dict) and isinstance(lc.get("time"), int | float):
            last_ckpt = float(lc["time"])
        else:
            times = [c["time"] for c in run.checkpoints()]
            last_ckpt = max(times) if times else None
        text = prometheus.render(
            status,
            st["status_age_seconds"],
            run.metrics.last_train(),
            run.files(0)["counts"],
            last_ckpt,
            bool((st["control"] or {}).get("paused")),
        )
        return Response(text, media_type=prometheus.CONTENT_TYPE)

    routes = [
        Route("/", page),
        Route("/api/status", api_status),
        Route("/api/files", api_files),
        Route("/api/metrics", api_metrics),
        Route("/api/checkpoints", api_checkpoints),
        Route("/api/config", api_config),
        Route("/api/compare", api_compare),
        Route("/api/checkpoints/{name}/verify", api_verify, methods=["POST"]),
        Route("/api/pause", api_pause, methods=["POST"]),
        Route("/api/resume", api_resume, methods=["POST"]),
        Route("/api/snapshot", api_snapshot, methods=["POST"]),
        Route("/api/inbox", api_inbox, methods=["POST"]),
        Route("/metrics", metrics_text),
        Mount("/static", StaticFiles(directory=str(static)), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.run = run
    app.add_middleware(_Access, token=token, loopback=loopback, cookie_name=cookie_name)
    return app
