"""Dashboard JSON API, Prometheus text, access token and uploads (Starlette test client).

The run directory here is synthetic but follows docs/run-directory.md exactly, with real
checkpoints written by evertrain.checkpoint; tests against a live daemon are in
test_dashboard_live.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient  # needs httpx

from evertrain.checkpoint import write_checkpoint
from evertrain.dashboard.app import create_app
from evertrain.dashboard.auth import TokenError, load_or_create_token
from evertrain.dashboard.metrics_tail import SMOOTHING, MetricsTail
from evertrain.dashboard.server import start_ui_process

LEDGER_SCHEMA = """CREATE TABLE files (id INTEGER PRIMARY KEY, name TEXT, path TEXT,
content_hash TEXT, size INTEGER, status TEXT, arrived_at REAL, started_at REAL,
finished_at REAL, examples INTEGER, tokens INTEGER, steps INTEGER, global_step_start INTEGER,
global_step_end INTEGER, loss_start REAL, loss_end REAL, val_loss_before REAL,
val_loss_after REAL, error TEXT)"""
STEPS_FILE1 = 30  # file 1 trained steps 1..30, file 3 is training steps 31..STEPS
STEPS = 48
REJECT_REASON = "bad.csv line 3: column 'text' is empty (fix the row or drop it)"


def train_loss(step: int) -> float:
    return 3.0 * math.exp(-step / 20) + 0.5 + 0.1 * math.sin(step)


def make_run(root: Path, now: float | None = None) -> Path:
    """A run directory as a daemon leaves it mid-training: file 1 done, file 2 rejected,
    file 3 training, file 4 queued; metrics, two checkpoints, one snapshot, status.json."""
    now = time.time() if now is None else now
    root.mkdir(parents=True, exist_ok=True)
    for d in ("inbox", "queue", "processed", "rejected", "snapshots"):
        (root / d).mkdir(exist_ok=True)
    con = sqlite3.connect(root / "ledger.sqlite")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute(LEDGER_SCHEMA)
    none = dict.fromkeys(("examples", "steps", "global_step_start", "global_step_end"))
    rows = [
        dict(id=1, name="notes.jsonl", status="done", examples=40, steps=30,
             global_step_start=1, global_step_end=30, loss_start=3.1, loss_end=0.9,
             val_loss_before=2.4, val_loss_after=1.7),
        dict(id=2, name="bad.csv", status="rejected", error=REJECT_REASON, **none),
        dict(id=3, name="more.jsonl", status="training", examples=40, global_step_start=31,
             loss_start=0.95, val_loss_before=2.2),
        dict(id=4, name="later.jsonl", status="queued"),
    ]  # fmt: skip
    for row in rows:
        row.update(
            path=f"queue/{row['id']}-{row['name']}",
            content_hash=f"{row['id']:032x}",
            size=1000 * row["id"],
            arrived_at=now - 3600 + row["id"],
        )
        cols = ", ".join(row)
        con.execute(
            f"INSERT INTO files ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values())
        )
    con.commit()
    con.close()
    lines: list[dict[str, Any]] = []
    for s in range(1, STEPS + 1):
        fid = 1 if s <= STEPS_FILE1 else 3
        lines.append(
            {"kind": "train", "global_step": s, "loss": train_loss(s), "lr": 1e-3 * min(1, s / 4),
             "grad_norm": 1.0, "tokens": 512, "examples": 8, "seconds": 0.25, "epoch": 0,
             "file_id": fid}
        )  # fmt: skip
        if s == STEPS_FILE1:
            lines.append({"kind": "eval", "global_step": s, "val_loss": 1.7, "val_ppl": 5.47,
                          "file_id": 1, "scope": "file"})  # fmt: skip
            lines.append(
                {"kind": "file_end", "global_step": s, "file_id": 1, "name": "notes.jsonl"}
            )
        if s == 40:
            lines.append({"kind": "eval", "global_step": s, "val_loss": 1.8, "val_ppl": 6.05,
                          "file_id": 1, "scope": "earlier"})  # fmt: skip
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for step in (30, 45):
        write_checkpoint(
            root / "checkpoints" / f"step-{step:08d}",
            {"model": {"version": 1, "w": torch.arange(256, dtype=torch.float32) * step}},
            {"global_step": step, "time": now - 600 + step, "metrics": {"val_loss": 1.7}},
            global_step=step,
        )
    snap = root / "snapshots" / "20240101-120000-step-30"
    snap.mkdir()
    (snap / "adapter_config.json").write_text("{}")
    (snap / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    status = {
        "state": "training", "pid": os.getpid(), "updated": now, "global_step": STEPS,
        "loss": 0.93, "lr": 1e-3, "tokens_per_second": 2048.0,
        "current_file": {"id": 3, "name": "more.jsonl", "examples_done": 18,
                         "examples_total": 40, "steps_done": 18, "steps_total": 40,
                         "percent": 45.0, "eta_seconds": 5.5},
        "queue": ["3-more.jsonl", "4-later.jsonl"],
        "last_checkpoint": {"global_step": 45, "path": str(root / "checkpoints/step-00000045"),
                            "time": now - 600 + 45},
        "last_snapshot": None,
        "counts": {"done": 1, "rejected": 1, "training": 1, "queued": 1},
    }  # fmt: skip
    (root / "status.json").write_text(json.dumps(status))
    return root


def client(run: Path, *, loopback: bool = True, max_upload: int = 1 << 20) -> TestClient:
    token, _ = load_or_create_token(run)
    app = create_app(run, token=token, loopback=loopback, port=8765, max_upload_bytes=max_upload)
    return TestClient(app, base_url="http://127.0.0.1:8765")


def auth(run: Path) -> dict[str, str]:
    return {"Authorization": "Bearer " + (run / "ui-token").read_text().strip()}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def test_status_reports_daemon_state_current_file_queue_and_inbox(run: Path) -> None:
    (run / "inbox" / "new.jsonl").write_text('{"text": "x"}\n')
    (run / "inbox" / "half.jsonl.part").write_text("{")  # being written: not listed
    d = client(run).get("/api/status").json()
    assert d["status"]["state"] == "training" and d["stale"] is False
    assert d["daemon_running"] is True  # status.json names this test's pid
    assert d["status"]["current_file"]["name"] == "more.jsonl"
    assert d["queue"] == ["3-more.jsonl", "4-later.jsonl"]
    assert [f["name"] for f in d["inbox"]] == ["new.jsonl"]
    assert d["last_train"]["global_step"] == STEPS
    assert ".jsonl" in d["upload_extensions"] and d["max_upload_bytes"] == 1 << 20

    status = json.loads((run / "status.json").read_text())
    status.update(updated=time.time() - 120)
    (run / "status.json").write_text(json.dumps(status))
    assert client(run).get("/api/status").json()["stale"] is True


def test_status_of_an_empty_run_directory(tmp_path: Path) -> None:
    d = client(tmp_path).get("/api/status").json()
    assert d["status"] is None and d["last_train"] is None and d["problems"] == []
    c = client(tmp_path)
    assert c.get("/api/files").json() == {"files": [], "counts": {}, "total": 0, "problem": None}
    assert not (tmp_path / "ledger.sqlite").exists()  # read-only: never created
    assert c.get("/api/checkpoints").json() == {"checkpoints": [], "snapshots": []}
    assert c.get("/api/metrics").json()["count"] == 0


def test_files_lists_ledger_rows_with_reject_reason(run: Path) -> None:
    d = client(run).get("/api/files").json()
    assert [f["status"] for f in d["files"]] == ["done", "rejected", "training", "queued"]
    assert d["files"][1]["error"] == REJECT_REASON
    assert d["files"][0]["loss_start"] == 3.1 and d["files"][0]["val_loss_after"] == 1.7
    assert d["counts"] == {"done": 1, "rejected": 1, "training": 1, "queued": 1}
    assert [f["id"] for f in client(run).get("/api/files?limit=2").json()["files"]] == [3, 4]
    assert client(run).get("/api/files?limit=x").status_code == 400


def test_metrics_since_step_thinning_and_smoothing(run: Path) -> None:
    c = client(run)
    d = c.get("/api/metrics").json()
    t = d["train"]
    assert t["global_step"] == list(range(1, STEPS + 1))
    assert t["loss"] == pytest.approx([train_loss(s) for s in range(1, STEPS + 1)])
    assert t["tokens_per_second"] == pytest.approx([512 / 0.25] * STEPS)
    ema = 0.0
    for n, x in enumerate(t["loss"], 1):  # debiased EMA, recomputed independently
        ema = SMOOTHING * ema + (1 - SMOOTHING) * x
        assert t["loss_smoothed"][n - 1] == pytest.approx(ema / (1 - SMOOTHING**n))
    assert [(e["global_step"], e["scope"]) for e in d["eval"]] == [(30, "file"), (40, "earlier")]
    assert d["file_end"] == [
        {"kind": "file_end", "global_step": 30, "file_id": 1, "name": "notes.jsonl"}
    ]
    later = c.get("/api/metrics?since_step=30").json()
    assert later["train"]["global_step"] == list(range(31, STEPS + 1))
    assert [e["global_step"] for e in later["eval"]] == [40] and later["file_end"] == []
    thin = c.get("/api/metrics?max_points=10").json()
    assert thin["stride"] == 5 and thin["count"] == STEPS
    assert thin["train"]["global_step"] == [1, 6, 11, 16, 21, 26, 31, 36, 41, 46, 48]
    assert c.get("/api/metrics?since_step=abc").status_code == 400

    # a diverged step (NaN) and a torn/garbage line must not break the response
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "global_step": 49, "loss": float("nan")}) + "\n")
        f.write("this is not json\n")
        f.write('{"kind": "train", "global_step": 50, "loss"')  # no newline yet: in flight
    d = c.get("/api/metrics?since_step=48").json()
    assert d["train"]["global_step"] == [49] and d["train"]["loss"] == [None]
    (problem,) = d["problems"]
    assert problem.startswith(f"metrics.jsonl line {STEPS + 5}: not valid JSON (")


def test_metrics_rewind_on_resume_starts_a_new_generation(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rec = [
        json.dumps({"kind": "train", "global_step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3)
    ]
    path.write_text("".join(rec))
    tail = MetricsTail(path)
    tail.refresh()
    assert tail.query()["train"]["loss"] == [1.0, 2.0, 3.0] and tail.generation == 0
    # the trainer truncates to the checkpoint at step 1 and replays with other values,
    # growing the file past the old length: only the changed bytes reveal the rewind
    replay = [
        json.dumps({"kind": "train", "global_step": s, "loss": 10.0 + s}) + "\n" for s in (2, 3, 4)
    ]
    with open(path, "r+") as f:
        f.truncate(len(rec[0]))
        f.seek(0, 2)
        f.write("".join(replay))
    tail.refresh()
    assert tail.generation == 1
    assert tail.query()["train"]["loss"] == [1.0, 12.0, 13.0, 14.0]
    with open(path, "a") as f:  # a plain append keeps the generation
        f.write(json.dumps({"kind": "train", "global_step": 5, "loss": 15.0}) + "\n")
    tail.refresh()
    assert tail.generation == 1 and tail.query(since_step=4)["train"]["loss"] == [15.0]


def test_checkpoints_snapshots_and_verify(run: Path) -> None:
    c = client(run)
    d = c.get("/api/checkpoints").json()
    assert [x["global_step"] for x in d["checkpoints"]] == [30, 45]
    size = sum(p.stat().st_size for p in (run / "checkpoints/step-00000045").iterdir())
    assert d["checkpoints"][1]["size_bytes"] == size and d["checkpoints"][1]["verify"] is None
    assert d["snapshots"][0]["name"] == "20240101-120000-step-30"
    assert d["snapshots"][0]["global_step"] == 30 and d["snapshots"][0]["size_bytes"] == 102

    h = auth(run)
    assert c.post("/api/checkpoints/step-00000030/verify").status_code == 401
    ok = c.post("/api/checkpoints/step-00000030/verify", headers=h).json()
    assert ok["ok"] is True and ok["problems"] == []
    blob = run / "checkpoints/step-00000045/model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor bytes
    blob.write_bytes(bytes(data))
    bad = c.post("/api/checkpoints/step-00000045/verify", headers=h).json()
    assert bad["ok"] is False and [p["file"] for p in bad["problems"]] == ["model.safetensors"]
    listed = {x["name"]: x["verify"] for x in c.get("/api/checkpoints").json()["checkpoints"]}
    assert listed["step-00000030"]["ok"] is True and listed["step-00000045"]["ok"] is False
    for name in ("step-1", "step-00000099", "manifest.json"):
        r = c.post(f"/api/checkpoints/{name}/verify", headers=h)
        assert r.status_code == 404 and "no such committed checkpoint" in r.json()["error"]


def _prom(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_prometheus_metrics(run: Path) -> None:
    r = client(run).get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = _prom(r.text)
    assert m["evertrain_global_step"] == STEPS and m["evertrain_loss"] == 0.93
    assert m["evertrain_learning_rate"] == 1e-3 and m["evertrain_tokens_per_second"] == 2048
    assert m['evertrain_files{status="done"}'] == 1 and m['evertrain_files{status="rejected"}'] == 1
    assert m['evertrain_files{status="duplicate"}'] == 0
    status = json.loads((run / "status.json").read_text())
    age = time.time() - status["last_checkpoint"]["time"]
    assert abs(m["evertrain_last_checkpoint_age_seconds"] - age) < 5
    assert m['evertrain_state{state="training"}'] == 1

    # without status.json: values from metrics.jsonl, checkpoint age from the manifests
    (run / "status.json").unlink()
    m = _prom(client(run).get("/metrics").text)
    assert m["evertrain_global_step"] == STEPS and "evertrain_status_age_seconds" not in m
    assert abs(m["evertrain_last_checkpoint_age_seconds"] - age) < 5


def test_pause_resume_and_snapshot_write_control_json(run: Path) -> None:
    c, h = client(run), auth(run)
    assert c.post("/api/pause").status_code == 401
    assert not (run / "control.json").exists()
    bad = c.post("/api/pause", headers={"Authorization": "Bearer " + "x" * 43})
    assert bad.status_code == 403 and "wrong" in bad.json()["error"]
    assert c.post("/api/pause", headers=h).json()["control"]["paused"] is True
    assert json.loads((run / "control.json").read_text())["paused"] is True
    t0 = time.time()
    assert c.post("/api/snapshot", headers=h).status_code == 200
    ctl = json.loads((run / "control.json").read_text())
    assert ctl["paused"] is True and ctl["snapshot_requested"] >= t0  # merged, not replaced
    assert (
        c.post("/api/resume", headers={"X-Evertrain-Token": h["Authorization"][7:]}).status_code
        == 200
    )
    assert json.loads((run / "control.json").read_text())["paused"] is False
    assert c.get("/api/status").json()["control"]["paused"] is False
    assert [p.name for p in run.iterdir() if p.name.startswith(".control")] == []


def test_loopback_refuses_foreign_host_header(run: Path) -> None:
    # DNS rebinding: evil.example resolved to 127.0.0.1 must not read the dashboard
    r = client(run).get("/api/status", headers={"Host": "evil.example:8765"})
    assert r.status_code == 403 and "loopback" in r.json()["error"]
    for host in ("localhost:8765", "[::1]:8765", "127.0.0.1"):
        assert client(run).get("/api/status", headers={"Host": host}).status_code == 200


def test_network_bind_needs_token_everywhere_cookie_only_for_reads(run: Path) -> None:
    c = client(run, loopback=False)
    token = (run / "ui-token").read_text().strip()
    for path in ("/", "/api/status", "/api/files", "/api/metrics", "/api/checkpoints",
                 "/metrics", "/static/dashboard.js"):  # fmt: skip
        assert c.get(path).status_code == 401, path
        assert c.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert c.get("/api/status?token=wrong").status_code == 403
    # the login link swaps the token in the URL for a cookie (and gets it out of the URL)
    r = c.get(f"/?token={token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert (
        "HttpOnly" in r.headers["set-cookie"]
        and "samesite=strict" in r.headers["set-cookie"].lower()
    )
    assert c.get("/api/status").status_code == 200  # the cookie is now sent
    page = c.get("/").text
    assert f'content="{token}"' in page  # the signed-in page can send the header
    # a cookie alone never authorises a change (CSRF: browsers send it cross-site)
    assert c.post("/api/pause").status_code == 401


def test_loopback_page_embeds_token_only_when_signed_in(run: Path) -> None:
    c = client(run)
    token = (run / "ui-token").read_text().strip()
    assert token not in c.get("/").text  # any local user may read; only the owner may act
    assert c.get(f"/?token={token}").status_code == 200
    assert token in c.get("/").text


def test_token_file_created_owner_only_and_refused_when_readable(tmp_path: Path) -> None:
    token, created = load_or_create_token(tmp_path)
    mode = stat.S_IMODE((tmp_path / "ui-token").stat().st_mode)
    assert created and mode == 0o600 and len(token) >= 32
    assert load_or_create_token(tmp_path) == (token, False)
    (tmp_path / "ui-token").chmod(0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        load_or_create_token(tmp_path)


BAD_NAMES = [
    ("../../x.jsonl", "is a path"),
    ("sub/x.jsonl", "is a path"),
    ("..\\x.jsonl", "is a path"),
    ("..", "is a path"),
    ("", "empty"),
    (".hidden.jsonl", "starts with '.'"),
    ("x.jsonl.part", ".part/.tmp"),
    ("a\x00b.jsonl", "control characters"),
    ("a\nb.jsonl", "control characters"),
    ("x.exe", "not a data format"),
    ("noext", "not a data format"),
    ("a$(rm).jsonl", "use letters"),
    ("x" * 201 + ".jsonl", "longer than 200 bytes"),
]


@pytest.mark.parametrize("name,why", BAD_NAMES)
def test_upload_refuses_bad_names(run: Path, name: str, why: str) -> None:
    c, h = client(run), auth(run)
    before = sorted(p.relative_to(run.parent) for p in run.parent.rglob("*"))
    r = c.post("/api/inbox", params={"name": name}, content=b'{"text": "hi"}\n', headers=h)
    assert r.status_code == 400 and why in r.json()["error"], r.json()
    after = sorted(p.relative_to(run.parent) for p in run.parent.rglob("*"))
    assert after == before  # nothing written anywhere, no .part left behind


def test_upload_writes_into_inbox_and_never_overwrites(run: Path) -> None:
    c, h = client(run), auth(run)
    body = b'{"text": "hello"}\n' * 1000
    assert c.post("/api/inbox", params={"name": "fresh.jsonl"}, content=body).status_code == 401
    r = c.post("/api/inbox", params={"name": "fresh.jsonl"}, content=body, headers=h)
    assert r.status_code == 201 and r.json()["size_bytes"] == len(body)
    assert (run / "inbox" / "fresh.jsonl").read_bytes() == body
    r = c.post("/api/inbox", params={"name": "fresh.jsonl"}, content=b"other\n", headers=h)
    assert r.status_code == 409 and "already waiting" in r.json()["error"]
    assert (run / "inbox" / "fresh.jsonl").read_bytes() == body
    assert sorted(os.listdir(run / "inbox")) == ["fresh.jsonl"]
    # names with spaces and accents (NFC) are fine
    r = c.post(
        "/api/inbox", params={"name": "Cafe\u0301 notes (v2).jsonl"}, content=b"x\n", headers=h
    )
    assert r.status_code == 201 and (run / "inbox" / "Caf\u00e9 notes (v2).jsonl").exists()
    assert c.post("/api/inbox", content=b"x", headers=h).status_code == 400  # no name


def test_upload_over_the_limit_is_refused(run: Path) -> None:
    c, h = client(run, max_upload=1000), auth(run)
    r = c.post("/api/inbox", params={"name": "big.jsonl"}, content=b"x" * 1001, headers=h)
    assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: caught while streaming
        for _ in range(5):
            yield b"y" * 300

    r = c.post("/api/inbox", params={"name": "big.jsonl"}, content=chunks(), headers=h)
    assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["error"]
    assert os.listdir(run / "inbox") == []  # the partial temporary file is gone
    r = c.post("/api/inbox", params={"name": "ok.jsonl"}, content=b"z" * 1000, headers=h)
    assert r.status_code == 201


def test_security_headers(run: Path) -> None:
    r = client(run).get("/")
    assert (
        r.headers["x-frame-options"] == "DENY"
        and "script-src 'self'" in r.headers["content-security-policy"]
    )
    assert "uPlot" in client(run).get("/static/uPlot.iife.min.js").text[:200]


def test_start_ui_process_serves_over_http_and_prints_token_once(run: Path) -> None:
    proc = start_ui_process(run, "127.0.0.1", 0, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        token = (run / "ui-token").read_text().strip()
        assert token in lines[0]  # created now: printed once
        url = re.search(r"at (http://\S+)", lines[2])
        assert url, lines
        with urllib.request.urlopen(url.group(1) + "api/status", timeout=30) as resp:
            assert json.loads(resp.read())["status"]["global_step"] == STEPS
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # a second start does not print the token again
    cmd = [sys.executable, "-m", "evertrain.dashboard", str(run), "--host", "256.0.0.1"]
    out = subprocess.run([*cmd, "--port", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot listen on 256.0.0.1:1" in out.stderr
    assert token not in out.stdout


def test_cli_ui_refuses_missing_run_directory(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evertrain.cli import app

    r = CliRunner().invoke(app, ["ui", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such run directory" in r.output


def test_large_metrics_file_is_sketched_first_then_read_exactly(tmp_path: Path) -> None:
    # 6000 steps (~0.6 MB, an eval every 100) with a bad line early in the history: the
    # first answer parses only the tail exactly and samples the rest; the background parse
    # then serves exactly what a full read does, line numbers of problems included
    path = tmp_path / "metrics.jsonl"
    lines = []
    for s in range(1, 6001):
        lines.append(json.dumps({"kind": "train", "global_step": s, "loss": 3.0 - s / 6000}))
        if s % 100 == 0:
            lines.append(json.dumps({"kind": "eval", "global_step": s, "val_loss": 1.0}))
        if s == 10:
            lines.append("not json")
    path.write_text("\n".join(lines) + "\n")
    exact = MetricsTail(path, sketch_above_bytes=1 << 40)
    exact.refresh()
    want = exact.query()
    assert want["complete"] and want["count"] == 6000 and len(want["eval"]) == 60
    assert want["problems"] == [
        "metrics.jsonl line 11: not valid JSON (Expecting value: "
        + ("line 1 column 1 (char 0)); line skipped")
    ]

    tail = MetricsTail(path, sketch_above_bytes=0)
    tail.refresh()
    first = tail.query()
    steps = first["train"]["global_step"]
    assert not first["complete"] and first["last_step"] == 6000 and first["generation"] == 0
    assert steps == sorted(set(steps)) and steps[0] < 100  # the whole history, sampled
    assert 0 < first["count"] < 6000 and first["problems"] == []
    assert 0 < len(first["eval"]) < 60  # evals of the exact tail only
    assert tail.wait_complete(30)
    got = tail.query()
    assert got["complete"] and got["generation"] == 1
    assert {k: v for k, v in got.items() if k != "generation"} == {
        k: v for k, v in want.items() if k != "generation"
    }
    with open(path, "a") as f:  # appends after the swap are read incrementally
        f.write(json.dumps({"kind": "train", "global_step": 6001, "loss": 1.0}) + "\n")
    tail.refresh()
    assert tail.query(since_step=6000)["train"]["global_step"] == [6001]
    assert tail.generation == 1


def test_thinned_query_caps_eval_and_file_end_records(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for s in range(1, 401):
            f.write(json.dumps({"kind": "train", "global_step": s, "loss": 1.0}) + "\n")
            f.write(json.dumps({"kind": "eval", "global_step": s, "val_loss": 1.0}) + "\n")
            f.write(json.dumps({"kind": "file_end", "global_step": s, "file_id": s}) + "\n")
    tail = MetricsTail(path)
    tail.refresh()
    q = tail.query(max_points=40)
    assert len(q["train"]["global_step"]) <= 41 and q["train"]["global_step"][-1] == 400
    evals = [e["global_step"] for e in q["eval"]]
    assert len(evals) <= 11 and evals[-1] == 400 and evals == sorted(evals)
    assert [e["file_id"] for e in q["file_end"]][-1] == 400 and len(q["file_end"]) <= 11
    assert len(tail.query()["eval"]) == 400  # max_points=0: every record
