"""The dashboard over a run that a tiny-model daemon is training: `evertrain watch --ui`.

Daemon and dashboard run as separate processes, one pair for the whole module (starting
the daemon costs seconds):
pause/resume through the API must be honoured by the running daemon, and the page in real
headless Chromium (Debian's ``chromium``, driven by Playwright with the system executable;
``scripts/install-browser-test-deps.sh`` installs both) must show the live run, list a
trained and a rejected file, and take an upload into the ledger. The screenshot is saved as
``test-artifacts/dashboard.png``. Only the browser test is skipped, with that hint, when
chromium is not installed.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "examples" / "data" / "tiny.jsonl"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WATCH_CONFIG = {
    "seed": 1234,
    "model": {"source": "tiny", "dtype": "float32"},
    "data": {"seq_len": 64, "val_fraction": 0.1, "num_workers": 0},
    "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "lr": 2e-3, "eval_every_steps": 10},
    "checkpoint": {"every_steps": 10, "keep_last": 2},
    "watch": {"settle_seconds": 0.2, "poll_seconds": 0.2, "status_every_seconds": 0.3},
}


def tiny_lines(start: int, stop: int) -> str:
    return "".join(TINY_DATA.read_text(encoding="utf-8").splitlines(True)[start:stop])


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Live:
    run: Path
    url: str
    token: str
    daemon: subprocess.Popen[bytes]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: bytes = b"") -> Any:
        req = urllib.request.Request(
            self.url + path.lstrip("/"),
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def status(self) -> dict[str, Any]:
        return self.get("/api/status")["status"] or {}

    def ledger(self) -> dict[str, str]:
        """name -> status, read from ledger.sqlite directly (not through the dashboard)."""
        uri = f"{(self.run / 'ledger.sqlite').as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            return dict(con.execute("SELECT name, status FROM files"))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """`evertrain watch RUN --ui --port 0` (daemon + dashboard), its first file trained."""
    tmp = tmp_path_factory.mktemp("live")
    run = tmp / "run"
    (run / "inbox").mkdir(parents=True)
    config = tmp / "watch.yaml"
    config.write_text(yaml.safe_dump(WATCH_CONFIG))
    (run / "inbox" / "first.jsonl").write_text(tiny_lines(0, 24))
    (run / "inbox" / "broken.csv").write_text("text\n\n")  # a header and no record
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "evertrain", "watch", str(run), "--config", str(config)]
    watch = subprocess.Popen([*cmd, "--ui", "--port", "0"], stdout=subprocess.PIPE, stderr=log)
    lines: queue.Queue[str] = queue.Queue()  # the dashboard's stdout is the watch's stdout

    def pump() -> None:
        assert watch.stdout is not None
        for raw in watch.stdout:
            lines.put(raw.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = None
        while url is None:
            try:
                m = re.search(r"serving .* at (http://\S+)", lines.get(timeout=60))
            except queue.Empty:
                raise AssertionError(
                    f"no dashboard URL: {(tmp / 'daemon.log').read_text()}"
                ) from None
            url = m.group(1) if m else None
        live = Live(run, url, (run / "ui-token").read_text().strip(), watch)

        def settled() -> bool:
            if watch.poll() is not None:
                raise AssertionError(f"daemon exited: {(tmp / 'daemon.log').read_text()}")
            return live.status().get("counts", {}).get("done") == 1

        wait_for("the first file to be trained", settled, timeout=90)
        yield live
    finally:
        watch.send_signal(signal.SIGTERM)  # checkpoint after the step in flight, then exit
        try:
            assert watch.wait(timeout=60) == 0, (tmp / "daemon.log").read_text()
        finally:
            if watch.poll() is None:
                watch.kill()
            log.close()
        with pytest.raises(urllib.error.URLError):  # the dashboard stopped with it
            urllib.request.urlopen(url + "api/status", timeout=5)


def test_pause_and_resume_are_honoured_by_the_running_daemon(live: Live) -> None:
    assert live.post("/api/inbox?name=long.jsonl", tiny_lines(40, 160).encode())["size_bytes"]

    def training_long() -> bool:
        cur = live.status().get("current_file") or {}
        return cur.get("name") == "long.jsonl" and cur.get("steps_done", 0) >= 2

    wait_for("training on long.jsonl", training_long)
    assert live.post("/api/pause")["control"]["paused"] is True
    wait_for("the daemon to pause", lambda: live.status().get("state") == "paused", 30)
    held = live.status()["global_step"]
    time.sleep(1.5)  # ~5 steps' time: none may happen while paused
    assert live.status()["global_step"] == held
    metrics = live.get(f"/api/metrics?since_step={held - 1}")
    assert metrics["last_step"] == held
    assert live.ledger()["long.jsonl"] == "training"
    with urllib.request.urlopen(live.url + "metrics", timeout=30) as r:  # Prometheus text
        assert f"evertrain_global_step {held}\n" in r.read().decode()

    assert live.post("/api/resume")["control"]["paused"] is False
    wait_for("training to go on", lambda: (live.status().get("global_step") or 0) > held, 30)
    assert live.status()["state"] in ("training", "idle")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed; run scripts/install-browser-test-deps.sh")
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        # a persistent context is Playwright's way to pass a fresh --user-data-dir
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        ctx.add_init_script(TEXT_BOXES_JS)
        try:
            yield ctx
        finally:
            ctx.close()


def coloured_pixels(page: Any, chart: str) -> int:
    """Pixels of a chart's canvas in a saturated series colour (data lines, not grey axes)."""
    return int(
        page.evaluate(
            """(id) => {
              const c = document.querySelector('#' + id + ' canvas');
              const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              let n = 0;
              for (let i = 0; i < d.length; i += 4) {
                const hi = Math.max(d[i], d[i + 1], d[i + 2]);
                const lo = Math.min(d[i], d[i + 1], d[i + 2]);
                if (d[i + 3] > 200 && hi - lo > 80) n++;
              }
              return n;
            }""",
            chart,
        )
    )


# Records the box of every text a canvas draws (uPlot draws tick labels, axis titles and the
# file names at file boundaries with fillText), reset whenever the whole canvas is cleared
# (each redraw), so window.__canvasTexts(canvas) is what the canvas shows now, in page px.
TEXT_BOXES_JS = """(() => {
  const rec = new WeakMap(), P = CanvasRenderingContext2D.prototype;
  const clear = P.clearRect, fill = P.fillText;
  P.clearRect = function (x, y, w, h) {
    const c = this.canvas;
    if (x <= 0 && y <= 0 && w >= c.width && h >= c.height) rec.set(c, []);
    return clear.apply(this, arguments);
  };
  P.fillText = function (text, x, y) {
    const m = this.measureText(text), t = this.getTransform(), xs = [], ys = [];
    const l = x - m.actualBoundingBoxLeft, r = x + m.actualBoundingBoxRight;
    const a = y - m.actualBoundingBoxAscent, d = y + m.actualBoundingBoxDescent;
    for (const [px, py] of [[l, a], [r, a], [l, d], [r, d]]) {
      const p = t.transformPoint(new DOMPoint(px, py)); xs.push(p.x); ys.push(p.y);
    }
    if (!rec.has(this.canvas)) rec.set(this.canvas, []);
    rec.get(this.canvas).push({ text: String(text), x0: Math.min(...xs), y0: Math.min(...ys),
                                x1: Math.max(...xs), y1: Math.max(...ys) });
    return fill.apply(this, arguments);
  };
  window.__canvasTexts = (c) => {
    const b = c.getBoundingClientRect(), sx = b.width / c.width, sy = b.height / c.height;
    return (rec.get(c) || []).filter((t) => t.text.trim()).map((t) => ({ text: t.text,
      left: b.left + t.x0 * sx, top: b.top + t.y0 * sy, right: b.left + t.x1 * sx,
      bottom: b.top + t.y1 * sy }));
  };
})();"""

CHART_BOXES_JS = """(id) => {
  const div = document.getElementById(id), c = div.querySelector('canvas');
  const box = (text, r) => ({ text, left: r.left, top: r.top, right: r.right, bottom: r.bottom });
  const boxes = window.__canvasTexts(c).map((t) => Object.assign(t, { kind: 'canvas' }));
  for (const tr of div.querySelectorAll('.u-legend tr')) {
    const r = tr.getBoundingClientRect();
    if (!r.width || !r.height) continue;
    boxes.push(Object.assign(box('legend ' + tr.textContent, r), { kind: 'legend' }));
  }
  const h = div.closest('.panel').querySelector('h2');
  const title = box('title ' + h.textContent, h.getBoundingClientRect());
  boxes.push(Object.assign(title, { kind: 'title' }));
  return { boxes, canvas: box('canvas', c.getBoundingClientRect()),
           panel: box('panel', div.closest('.panel').getBoundingClientRect()) };
}"""


def assert_no_overlaps(page: Any, charts: list[str]) -> None:
    """No two texts of a chart (tick labels, axis titles, file names on the canvas, legend
    items, the panel title) intersect, canvas texts lie inside the canvas, and each chart
    fits in its panel."""
    tol = 0.5  # px: anti-aliasing, rounding of fractional layout

    def hit(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return (
            a["left"] < b["right"] - tol
            and b["left"] < a["right"] - tol
            and a["top"] < b["bottom"] - tol
            and b["top"] < a["bottom"] - tol
        )

    for chart in charts:
        d = page.evaluate(CHART_BOXES_JS, f"chart-{chart}")
        boxes, canvas, panel = d["boxes"], d["canvas"], d["panel"]
        texts = [b["text"] for b in boxes if b["kind"] == "canvas"]
        # drawn: both axis titles and at least two ticks on each axis
        assert "global step" in texts and len(texts) >= 5, (chart, texts)
        assert any(b["kind"] == "legend" for b in boxes), chart
        for b in boxes:
            if b["kind"] == "canvas":
                assert canvas["left"] - tol <= b["left"] and b["right"] <= canvas["right"] + tol
                assert canvas["top"] - tol <= b["top"] and b["bottom"] <= canvas["bottom"] + tol
        assert panel["left"] <= canvas["left"] and canvas["right"] <= panel["right"] + tol, chart
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert not hit(a, b), f"{chart}: {a} overlaps {b}"


def check_overlaps_at_widths(page: Any, charts: list[str]) -> None:
    """:func:`assert_no_overlaps` at a desktop and a narrow (600 px) viewport."""
    for width in (1400, 600):
        page.set_viewport_size({"width": width, "height": 1000})
        # the resize handler resizes the charts; let the next poll redraw them too
        polls = int(page.get_attribute("body", "data-polls") or 0)
        page.wait_for_selector(f'body:not([data-polls="{polls}"])', state="attached")
        assert_no_overlaps(page, charts)


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="chromium is not installed; run scripts/install-browser-test-deps.sh",
)
def test_dashboard_in_headless_chromium(live: Live, tmp_path: Path) -> None:
    upload = tmp_path / "from-browser.jsonl"
    upload.write_text(tiny_lines(160, 200))
    errors: list[str] = []
    with chromium() as ctx:
        page = ctx.new_page()
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
        page.goto(live.url)  # on loopback anyone local may look; acting needs the token
        # the page's script has run a poll (its handlers are attached): on a loaded machine a
        # click right after the navigation could land before them and do nothing
        page.wait_for_selector("body[data-polls]", state="attached", timeout=60000)
        page.click("#btn-snapshot")
        page.wait_for_selector(
            "#control-msg:has-text('sign in with the access token')", timeout=60000
        )
        page.fill("#token-input", live.token)
        with page.expect_navigation(url=live.url):  # /?token= sets a cookie, redirects to /
            page.click("#btn-token")
        assert page.get_attribute('meta[name="evertrain-token"]', "content") == live.token
        # two full poll rounds: status, metrics, files and checkpoints all rendered
        page.wait_for_selector('body[data-polls]:not([data-polls="1"])', state="attached")

        for chart in ("loss", "lr", "tps", "gnorm", "eval"):
            assert int(page.get_attribute(f"#chart-{chart}", "data-points") or 0) > 0, chart
            assert coloured_pixels(page, f"chart-{chart}") > 50, chart  # lines were drawn
        rows = page.locator("#files-table tbody tr").all_inner_texts()
        assert any("first.jsonl" in r and "done" in r for r in rows), rows
        assert any("broken.csv" in r and "rejected" in r and "no valid records" in r for r in rows)
        assert page.locator("#checkpoints-table tbody tr").count() >= 1
        assert page.locator("#compare").is_hidden()  # one run: nothing to compare

        # the stored config of the newest checkpoint, collapsed until opened
        page.wait_for_selector("#config-view details", state="attached")
        assert not page.locator("#config-view").is_visible()
        page.click("#config summary")
        text = page.inner_text("#config-view")
        assert "source: tiny" in text and "seq_len: 64" in text, text
        assert page.locator("#config-view details[data-section=train]").count() == 1
        check_overlaps_at_widths(page, ["loss", "lr", "tps", "gnorm", "eval"])
        page.set_viewport_size({"width": 1400, "height": 1000})

        page.click("#btn-snapshot")  # the daemon exports one after its current step
        page.wait_for_selector("#snapshots-table td:has-text('-step-')", timeout=30000)

        page.set_input_files("#upload-file", str(upload))
        page.click("#btn-upload")
        page.wait_for_selector("#upload-msg:has-text('uploaded from-browser.jsonl')")
        wait_for("the upload in the ledger", lambda: "from-browser.jsonl" in live.ledger())
        page.wait_for_selector("#files-table td:has-text('from-browser.jsonl')", timeout=15000)

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        page.click("#btn-pause")  # the daemon honouring it is tested above
        page.wait_for_selector("#btn-pause:has-text('Resume')")
        assert json.loads((live.run / "control.json").read_text())["paused"] is True
        page.click("#btn-pause")
        page.wait_for_selector("#btn-pause:has-text('Pause')")
        assert json.loads((live.run / "control.json").read_text())["paused"] is False

    assert errors == []


@pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="chromium is not installed; run scripts/install-browser-test-deps.sh",
)
def test_compare_runs_in_headless_chromium(tmp_path: Path) -> None:
    """`python -m evertrain.dashboard RUNS/baseline --compare RUNS` (a directory of two
    runs, one of them the dashboard's own): one chart with both loss curves, named by run
    directory, labels clear of each other; the status panel shows the status derived for
    a run without status.json."""
    parent = tmp_path / "runs"
    for name, scale, steps in (("baseline", 3.0, 3000), ("lr-2x", 2.0, 1800)):
        (parent / name).mkdir(parents=True)
        lines = [
            json.dumps(
                {
                    "kind": "train",
                    "global_step": s,
                    "loss": scale / s**0.3,
                    "lr": 1e-3,
                    "grad_norm": 1.0,
                    "tokens": 512,
                    "seconds": 0.1,
                }
            )  # fmt: skip
            for s in range(1, steps + 1)
        ]
        (parent / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    ui = subprocess.Popen(
        [sys.executable, "-m", "evertrain.dashboard", str(parent / "baseline"), "--port", "0"]
        + ["--compare", str(parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    errors: list[str] = []
    try:
        url = None
        assert ui.stdout is not None
        for line in ui.stdout:
            m = re.search(r"serving .* at (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "no dashboard URL"
        with chromium() as ctx:
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(url)
            page.wait_for_selector("#compare:not([hidden])", timeout=60000)
            page.wait_for_selector("body[data-polls]", state="attached")  # all rendered
            assert int(page.get_attribute("#chart-compare", "data-points") or 0) > 100
            legend = page.locator("#chart-compare .u-legend th").all_inner_texts()
            assert any("baseline" in t for t in legend) and any("lr-2x" in t for t in legend)
            assert coloured_pixels(page, "chart-compare") > 100
            assert page.inner_text("#state") == "train run: stopped"
            assert page.inner_text("#m-step") == "3,000"
            assert "no process holds the run" in page.inner_text("#updated")
            check_overlaps_at_widths(page, ["compare"])
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    assert errors == []
