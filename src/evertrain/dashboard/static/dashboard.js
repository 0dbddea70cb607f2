/* evertrain dashboard: polls the JSON API and draws with uPlot (vendored, see VENDORED.md).
 * Every value from the run directory is put into the page with textContent, never innerHTML:
 * file names and reject reasons come from uploads and must not become markup. */
"use strict";

const TOKEN = document.querySelector('meta[name="evertrain-token"]').content;
const POLL_MS = 2000;
const SLOW_EVERY = 3; // checkpoints (a directory walk each) every 3rd poll
const INITIAL_POINTS = 1000; // first load of a long run is thinned to this many train points
// (metrics_tail.CHART_POINTS: about one per pixel, and as fast at 10^6 steps as at 10^3)
const MAX_POINTS = 5 * INITIAL_POINTS; // then new points are appended until this many
const MAX_EVAL_SERIES = 10; // held-out sets shown (newest files)
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
  "#be185d", "#4d7c0f", "#7c3aed", "#b45309"];

const $ = (id) => document.getElementById(id);
const state = {
  status: null, control: null, maxUpload: 0, extensions: [],
  gen: null, steps: [], loss: [], smooth: [], lr: [], tps: [], gnorm: [], evals: [], fileEnds: [],
  charts: {}, tick: 0, fileNames: new Map(), configKey: null, compare: null,
};
const SERIES_KEYS = ["steps", "loss", "smooth", "lr", "tps", "gnorm"];
window.evertrain = state; // for the browser test and for poking around in the console

// ---- formatting -------------------------------------------------------------------------
function fmtNum(x, digits = 4) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en-US");
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(2);
  return x.toPrecision(digits);
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  s = Math.max(0, s);
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function fmtAge(t) {
  if (!t) return "–";
  return fmtDuration(Date.now() / 1000 - t) + " ago";
}
function fmtTime(t) {
  if (!t) return "–";
  const d = new Date(t * 1000), p = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " + p(d.getHours()) + ":" + p(d.getMinutes());
}
// compact global steps for the x axis ("12.5k", "3M"): narrow labels leave room for more
// ticks without overlapping
function fmtStep(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a < 1e4) return String(+v.toPrecision(6));
  if (a < 1e6) return +(v / 1e3).toPrecision(4) + "k";
  if (a < 1e9) return +(v / 1e6).toPrecision(4) + "M";
  return +(v / 1e9).toPrecision(4) + "G";
}
function fmtAxis(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-2 || a >= 1e5)) return v.toExponential(1);
  return String(+v.toPrecision(6));
}

// ---- API --------------------------------------------------------------------------------
async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (TOKEN) headers["Authorization"] = "Bearer " + TOKEN;
  const resp = await fetch(path, Object.assign({}, opts, { headers, credentials: "same-origin" }));
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: resp.status + " " + resp.statusText }; }
  if (!resp.ok) throw new Error((body && body.error) || resp.statusText);
  return body;
}

// ---- DOM helpers ------------------------------------------------------------------------
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
function fillTable(table, rows) {
  const body = table.tBodies[0];
  body.replaceChildren(...rows);
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    if (c instanceof Node) { const td = el("td"); td.appendChild(c); tr.appendChild(td); }
    else if (typeof c === "object" && c !== null) { tr.appendChild(el("td", c.text, c.cls)); }
    else tr.appendChild(el("td", c));
  }
  return tr;
}

// ---- status -----------------------------------------------------------------------------
function renderStatus(d) {
  state.status = d.status; state.control = d.control;
  state.maxUpload = d.max_upload_bytes; state.extensions = d.upload_extensions || [];
  // a run of `evertrain train` has no status.json: the server derives one (d.derived)
  // from metrics.jsonl, the newest checkpoint and whether a process holds daemon.lock
  const dv = d.status ? null : d.derived;
  const s = d.status || dv || {};
  const lt = d.last_train || {};
  $("run-dir").textContent = d.run_dir;
  const st = (d.status || dv) ? (s.state || "unknown") : "no status yet";
  const badge = $("state");
  badge.textContent = dv ? dv.kind + " run: " + st : st;
  badge.className = "badge " + ((d.status || dv) ? (s.state || "unknown") : "unknown");
  const stale = $("stale");
  if (d.stale) {
    stale.hidden = false;
    stale.textContent = d.daemon_running === false
      ? "daemon not running (status is from " + fmtAge(s.updated) + ")"
      : "status not updated for " + fmtDuration(d.status_age_seconds) + ": is the daemon stuck?";
  } else stale.hidden = true;
  const warning = $("daemon-warning");
  warning.hidden = !s.warning;
  warning.textContent = s.warning ? "daemon: " + s.warning : "";
  let updated = "";
  if (d.status) updated = "updated " + fmtAge(s.updated);
  else if (dv) {
    const who = dv.state === "training" ? "pid " + dv.pid + (dv.host ? " on " + dv.host : "") + " holds the run"
      : dv.state === "unknown" ? "held from host " + dv.host + "?" : "no process holds the run";
    updated = who + " · metrics written " + fmtAge(s.updated);
  }
  $("updated").textContent = updated;
  $("m-step").textContent = fmtNum(s.global_step ?? lt.global_step);
  $("m-loss").textContent = fmtNum(s.loss ?? lt.loss_smoothed);
  $("m-lr").textContent = fmtNum(s.lr ?? lt.lr, 3);
  $("m-tps").textContent = fmtNum(s.tokens_per_second ?? lt.tokens_per_second, 4);
  $("m-gnorm").textContent = fmtNum(s.grad_norm ?? lt.grad_norm, 3);
  const lc = s.last_checkpoint;
  $("m-ckpt").textContent = lc ? "step " + fmtNum(lc.global_step) + ", " + fmtAge(lc.time) : "–";
  const counts = s.counts || {};
  const nonzero = Object.entries(counts).filter(([, v]) => v);
  $("m-files").textContent = nonzero.length ? nonzero.map(([k, v]) => k + " " + v).join(" · ") : "–";

  const cf = s.current_file;
  $("current-none").hidden = !!cf;
  $("current-file").hidden = !cf;
  if (cf) {
    $("cur-name").textContent = cf.name;
    $("cur-detail").textContent = "file " + cf.id + " · examples " + fmtNum(cf.examples_done) + " / "
      + fmtNum(cf.examples_total) + " · steps " + fmtNum(cf.steps_done) + " / " + fmtNum(cf.steps_total);
    const pct = Math.max(0, Math.min(100, cf.percent || 0));
    $("cur-bar").style.width = pct + "%";
    $("cur-pct").textContent = pct.toFixed(1) + " %";
    $("cur-eta").textContent = "ETA " + fmtDuration(cf.eta_seconds);
  }

  const paused = !!(d.control && d.control.paused);
  $("btn-pause").textContent = paused ? "Resume" : "Pause";
  let msg = "";
  if (paused && s.state !== "paused") msg = "pause requested; the daemon pauses after the current step";
  else if (!paused && s.state === "paused") msg = "resume requested";
  else if (paused) msg = "paused";
  const snap = d.control && d.control.snapshot_requested;
  const lastSnap = s.last_snapshot && s.last_snapshot.time;
  if (snap && (!lastSnap || lastSnap < snap)) msg += (msg ? " · " : "") + "snapshot requested " + fmtAge(snap);
  $("control-msg").textContent = msg;

  $("queue-list").replaceChildren(...(d.queue.length ? d.queue.map((q) => el("li", q)) : [el("li", "empty", "muted")]));
  $("inbox-list").replaceChildren(...(d.inbox.length
    ? d.inbox.map((f) => el("li", f.name + " (" + fmtBytes(f.size_bytes) + ")"))
    : [el("li", "empty", "muted")]));
  setProblems("status", d.problems);
}

const problems = {};
function setProblems(key, list) {
  problems[key] = list || [];
  const all = Object.values(problems).flat();
  $("problems").hidden = all.length === 0;
  $("problems-list").replaceChildren(...all.map((p) => el("li", p)));
}

// ---- files, checkpoints -------------------------------------------------------------------
function pair(a, b) {
  return (a === null && b === null) ? "–" : fmtNum(a) + " → " + fmtNum(b);
}
function renderFiles(d) {
  $("files-total").textContent = "(" + d.total + ")";
  for (const f of d.files) state.fileNames.set(f.id, f.name);
  const rows = [...d.files].reverse().map((f) => row([
    { text: f.id, cls: "num" }, f.name, { text: f.status, cls: "st st-" + f.status },
    fmtTime(f.arrived_at), { text: fmtNum(f.examples), cls: "num" }, { text: fmtNum(f.steps), cls: "num" },
    f.global_step_start === null ? "–"
      : fmtNum(f.global_step_start) + "–" + (f.global_step_end === null ? "…" : fmtNum(f.global_step_end)),
    pair(f.loss_start, f.loss_end), pair(f.val_loss_before, f.val_loss_after), f.error || "",
  ]));
  fillTable($("files-table"), rows.length ? rows : [emptyRow(10, "no files yet: upload one or drop it into the run's inbox/")]);
  setProblems("files", d.problem ? [d.problem] : []);
}

function emptyRow(span, text) {
  const tr = document.createElement("tr");
  const td = el("td", text, "muted");
  td.colSpan = span;
  tr.appendChild(td);
  return tr;
}

function renderCheckpoints(d) {
  if (!d.checkpoints.length) fillTable($("checkpoints-table"), [emptyRow(6, "none yet")]);
  else fillTable($("checkpoints-table"), [...d.checkpoints].reverse().map((c) => {
    const v = c.verify;
    let verified;
    if (!v) verified = { text: "not checked", cls: "muted" };
    else if (v.ok) verified = { text: "ok (" + fmtAge(v.checked_at) + ")", cls: "ok" };
    else verified = { text: "DAMAGED: " + v.problems.filter((p) => p.fatal).map((p) => p.file + ": " + p.message).join("; "), cls: "bad" };
    const b = el("button", "Verify");
    b.type = "button";
    b.dataset.name = c.name;
    b.addEventListener("click", () => verify(c.name, b));
    return row([c.name, { text: fmtNum(c.global_step), cls: "num" }, fmtAge(c.time), fmtBytes(c.size_bytes), verified, b]);
  }));
  if (!d.snapshots.length) fillTable($("snapshots-table"), [emptyRow(5, "none yet")]);
  else fillTable($("snapshots-table"), [...d.snapshots].reverse().map((s) => row([
    s.name, { text: fmtNum(s.global_step), cls: "num" }, fmtAge(s.time), fmtBytes(s.size_bytes), s.files.join(", "),
  ])));
}

// ---- metrics and charts -------------------------------------------------------------------
async function loadMetrics() {
  const have = state.steps.length;
  // re-ask for the newest step: its eval/file_end lines may be written after its train line
  const since = have ? state.steps[have - 1] - 1 : -1;
  const q = have ? "since_step=" + since : "since_step=-1&max_points=" + INITIAL_POINTS;
  const d = await api("/api/metrics?" + q);
  if ((state.gen !== null && d.generation !== state.gen) || state.steps.length > MAX_POINTS) {
    // the run resumed from an older checkpoint and the log was rewound, or a tab left open
    // for days has collected too many points: load again (thinned)
    for (const k of SERIES_KEYS) state[k] = [];
    Object.assign(state, { gen: null, evals: [], fileEnds: [] });
    return loadMetrics();
  }
  state.gen = d.generation;
  if (have) {
    let i = state.steps.length;
    while (i > 0 && state.steps[i - 1] > since) i--;
    for (const k of SERIES_KEYS) state[k].length = i;
    state.evals = state.evals.filter((e) => e.global_step <= since);
    state.fileEnds = state.fileEnds.filter((e) => e.global_step <= since);
  }
  const t = d.train;
  state.steps.push(...t.global_step); state.loss.push(...t.loss); state.smooth.push(...t.loss_smoothed);
  state.lr.push(...t.lr); state.tps.push(...t.tokens_per_second); state.gnorm.push(...t.grad_norm);
  state.evals.push(...d.eval); state.fileEnds.push(...d.file_end);
  setProblems("metrics", d.problems);
  drawCharts();
}

function boundaries() {
  return {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx, { left, top, width, height } = u.bbox, px = uPlot.pxRatio;
        ctx.save();
        ctx.strokeStyle = "#9ca3af"; ctx.fillStyle = "#6b7280"; ctx.lineWidth = px;
        ctx.setLineDash([4 * px, 4 * px]); ctx.font = (10 * px) + "px sans-serif";
        ctx.textAlign = "left"; ctx.textBaseline = "alphabetic";
        // a name is written only where it fits: not over the previous one (files that end
        // at nearly the same step) and not past the plot's right edge
        let free = left;
        for (const b of state.fileEnds) {
          const x = Math.round(u.valToPos(b.global_step, "x", true));
          if (x < left || x > left + width) continue;
          ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
          const name = String(b.name || "file " + b.file_id).slice(0, 24);
          const tx = x + 3 * px, w = ctx.measureText(name).width;
          if (tx < free || tx + w > left + width) continue;
          ctx.fillText(name, tx, top + 11 * px);
          free = tx + w + 6 * px;
        }
        ctx.restore();
      }],
    },
  };
}

function chartSize(div) {
  return { width: Math.max(200, div.clientWidth), height: 240 };
}

// Axis labels are drawn on the canvas. They never overlap because: x ticks are at least
// as far apart as their widest label plus a margin (space), at round integer steps (incrs);
// the y axis is as wide as its widest tick label (size), so the rotated axis title beside
// it (labelSize) stays clear of them. The browser test checks this with bounding boxes.
const AXIS_FONT = "12px system-ui, sans-serif";
const LABEL_FONT = "bold 12px system-ui, sans-serif";
const STEP_INCRS = [];
for (let m = 1; m <= 1e12; m *= 10) STEP_INCRS.push(m, 2 * m, 5 * m);
const measurer = document.createElement("canvas").getContext("2d");
function textWidth(text, font) {
  measurer.font = font;
  return measurer.measureText(text).width;
}
function xAxis() {
  return {
    label: "global step", font: AXIS_FONT, labelFont: LABEL_FONT, incrs: STEP_INCRS,
    values: (u, vals) => vals.map(fmtStep),
    space: (u, i, min, max) => Math.max(40, 16 + Math.max(textWidth(fmtStep(min), AXIS_FONT),
      textWidth(fmtStep(max), AXIS_FONT), textWidth(fmtStep((max - min) / 3), AXIS_FONT))),
  };
}
function yAxis(label) {
  return {
    label, font: AXIS_FONT, labelFont: LABEL_FONT, gap: 6, space: 24,
    values: (u, vals) => vals.map(fmtAxis),
    size: (u, values, i, cycle) => {
      const a = u.axes[i];
      if (cycle > 1 && a._size) return a._size; // settle: uPlot re-asks after a resize
      const w = Math.max(0, ...(values || []).map((v) => textWidth(String(v), AXIS_FONT)));
      return Math.ceil(a.ticks.size + a.gap + w + 4);
    },
  };
}

function makeOrUpdate(key, series, data, yLabel, xRange) {
  const div = $("chart-" + key);
  div.dataset.points = String(data[0].length);
  let u = state.charts[key];
  const labels = (ss) => ss.map((x) => x.label).join("\u0000");
  if (u && labels(u.series.slice(1)) !== labels(series)) { u.destroy(); u = null; }
  if (!u) {
    div.replaceChildren();
    const opts = Object.assign(chartSize(div), {
      scales: { x: xRange ? { time: false, range: xRange } : { time: false } },
      series: [{ label: "global step" }, ...series],
      axes: [xAxis(), yAxis(yLabel)],
      plugins: key === "compare" ? [] : [boundaries()], // file ends are per run
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
    });
    u = new uPlot(opts, data, div);
    state.charts[key] = u;
  } else {
    u.setData(data);
  }
}

function drawCharts() {
  const x = state.steps;
  if (x.length) {
    makeOrUpdate("loss", [
      { label: "loss", stroke: "rgba(37,99,235,0.35)", width: 1 },
      { label: "smoothed", stroke: "#1d4ed8", width: 2 },
    ], [x, state.loss, state.smooth], "nats");
    makeOrUpdate("lr", [{ label: "lr", stroke: "#16a34a", width: 2 }], [x, state.lr], "lr");
    makeOrUpdate("tps", [{ label: "tokens/s", stroke: "#ea580c", width: 1 }], [x, state.tps], "tokens/s");
    makeOrUpdate("gnorm", [{ label: "grad norm", stroke: "#9333ea", width: 1 }], [x, state.gnorm], "grad norm");
  } else {
    for (const k of ["loss", "lr", "tps", "gnorm"]) if (!state.charts[k]) $("chart-" + k).textContent = "no training steps yet";
  }
  // held-out loss: one series per file's held-out split, measured after that file ("file")
  // and after each later file ("earlier"), so a rising line shows forgetting
  const byFile = new Map();
  for (const e of state.evals) {
    if (e.val_loss === null || e.val_loss === undefined) continue;
    const key = e.file_id === undefined || e.file_id === null ? "run" : e.file_id;
    if (!byFile.has(key)) byFile.set(key, []);
    byFile.get(key).push([e.global_step, e.val_loss]);
  }
  const keys = [...byFile.keys()].slice(-MAX_EVAL_SERIES);
  if (keys.length) {
    const names = new Map([...state.fileNames, ...state.fileEnds.map((f) => [f.file_id, f.name])]);
    const tables = keys.map((k) => {
      const pts = byFile.get(k).sort((a, b) => a[0] - b[0]);
      return [pts.map((p) => p[0]), pts.map((p) => p[1])];
    });
    const data = uPlot.join(tables);
    const series = keys.map((k, i) => ({
      label: k === "run" ? "held-out" : "file " + k + (names.has(k) ? " " + names.get(k) : ""),
      stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { show: true, size: 6 },
    }));
    // same x extent as the training charts, so file boundaries line up across charts
    const xRange = (u, lo, hi) => state.steps.length
      ? [Math.min(lo, state.steps[0]), Math.max(hi, state.steps[state.steps.length - 1])] : [lo, hi];
    makeOrUpdate("eval", series, data, "held-out loss", xRange);
  } else if (!state.charts.eval) {
    $("chart-eval").textContent = "no held-out evaluations yet";
  }
}

window.addEventListener("resize", () => {
  for (const [k, u] of Object.entries(state.charts)) u.setSize(chartSize($("chart-" + k)));
});

// ---- stored config ---------------------------------------------------------------------------
// the config as YAML-like text; strings that YAML would read as something else are quoted
function yamlScalar(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v !== "string") return String(v);
  const plain = /^[A-Za-z0-9_./@+-][A-Za-z0-9_./@+ :-]*$/.test(v) && !/: |:$| $/.test(v)
    && !/^(true|false|null|yes|no|on|off|~|[-+]?[0-9.eE+-]+)$/i.test(v);
  return plain ? v : JSON.stringify(v);
}
function yamlLines(v, indent, out) {
  const pad = " ".repeat(indent);
  if (Array.isArray(v)) {
    for (const x of v) {
      if (x !== null && typeof x === "object" && Object.keys(x).length) {
        const sub = [];
        yamlLines(x, indent + 2, sub);
        out.push(pad + "- " + sub[0].trimStart(), ...sub.slice(1));
      } else out.push(pad + "- " + (x !== null && typeof x === "object" ? (Array.isArray(x) ? "[]" : "{}") : yamlScalar(x)));
    }
    return out;
  }
  for (const [k, x] of Object.entries(v)) {
    if (x !== null && typeof x === "object" && Object.keys(x).length) {
      out.push(pad + k + ":");
      yamlLines(x, indent + 2, out);
    } else out.push(pad + k + ": " + (x !== null && typeof x === "object" ? (Array.isArray(x) ? "[]" : "{}") : yamlScalar(x)));
  }
  return out;
}
function renderConfig(d) {
  const key = JSON.stringify([d.checkpoint, d.problem]);
  if (key === state.configKey) return;
  state.configKey = key;
  $("config-source").textContent = d.checkpoint
    ? "(stored in checkpoints/" + d.checkpoint + ", step " + fmtNum(d.global_step) + ")" : "";
  const view = $("config-view");
  if (!d.config) {
    view.replaceChildren(el("div", d.problem || (d.checkpoint
      ? "this checkpoint stores no run config" : "no checkpoint yet: the config is stored with the first one"),
    d.problem ? "bad" : "muted"));
    return;
  }
  // one collapsible block per section (model, data, train, ...); top-level scalars first
  const scalars = Object.entries(d.config).filter(([, v]) => v === null || typeof v !== "object");
  const parts = [];
  if (scalars.length) parts.push(el("pre", yamlLines(Object.fromEntries(scalars), 0, []).join("\n")));
  for (const [k, v] of Object.entries(d.config)) {
    if (v === null || typeof v !== "object") continue;
    const det = el("details");
    det.open = true;
    det.dataset.section = k;
    det.append(el("summary", k), el("pre", yamlLines(v, 2, []).join("\n") || "  (empty)"));
    parts.push(det);
  }
  view.replaceChildren(...parts);
}

// ---- compare runs ----------------------------------------------------------------------------
function renderCompare(d) {
  const runs = d.runs || [];
  $("compare").hidden = runs.length < 2;
  state.compare = runs;
  if (runs.length < 2) return;
  const data = uPlot.join(runs.map((r) => [r.global_step, r.loss_smoothed]));
  const series = runs.map((r, i) => ({
    label: r.name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
  }));
  $("compare-runs").textContent = runs.map((r) => r.name + ": " + (r.last_step === null ? "no steps"
    : "step " + fmtNum(r.last_step))).join(" · ");
  makeOrUpdate("compare", series, data, "smoothed loss (nats)");
  setProblems("compare", runs.flatMap((r) => r.problems.map((p) => r.name + ": " + p)));
}

// ---- actions -------------------------------------------------------------------------------
function needToken(msgEl) {
  if (TOKEN) return false;
  $("token-row").hidden = false;
  msgEl.textContent = "sign in with the access token first";
  return true;
}

async function control(path, msgEl) {
  if (needToken(msgEl)) return;
  try {
    await api(path, { method: "POST" });
    await refreshStatus();
  } catch (e) { msgEl.textContent = e.message; }
}

$("btn-pause").addEventListener("click", () => {
  const paused = !!(state.control && state.control.paused);
  control(paused ? "/api/resume" : "/api/pause", $("control-msg"));
});
$("btn-snapshot").addEventListener("click", () => control("/api/snapshot", $("control-msg")));

$("btn-upload").addEventListener("click", async () => {
  const msg = $("upload-msg");
  const f = $("upload-file").files[0];
  if (!f) { msg.textContent = "choose a file first"; return; }
  if (needToken(msg)) return;
  if (state.maxUpload && f.size > state.maxUpload) {
    msg.textContent = "refused: " + f.name + " is " + fmtBytes(f.size) + ", over the dashboard's limit of "
      + fmtBytes(state.maxUpload) + "; copy it into the run's inbox/ directly";
    return;
  }
  msg.textContent = "uploading " + f.name + " (" + fmtBytes(f.size) + ")…";
  $("btn-upload").disabled = true;
  try {
    const r = await api("/api/inbox?name=" + encodeURIComponent(f.name), { method: "POST", body: f });
    msg.textContent = "uploaded " + r.name + " (" + fmtBytes(r.size_bytes) + ") into the inbox";
    $("upload-file").value = "";
    await refreshStatus();
  } catch (e) {
    msg.textContent = e.message;
  } finally {
    $("btn-upload").disabled = false;
  }
});

$("token-row").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token-input").value.trim();
  if (t) window.location.href = "/?token=" + encodeURIComponent(t);
});

async function verify(name, button) {
  if (needToken($("control-msg"))) return;
  button.disabled = true;
  button.textContent = "verifying…";
  try {
    await api("/api/checkpoints/" + encodeURIComponent(name) + "/verify", { method: "POST" });
    renderCheckpoints(await api("/api/checkpoints"));
  } catch (e) {
    button.textContent = "error";
    setProblems("verify", [name + ": " + e.message]);
  }
}

// ---- polling -------------------------------------------------------------------------------
async function refreshStatus() {
  renderStatus(await api("/api/status"));
}

async function poll() {
  if (!document.hidden || state.tick === 0) {
    const lc = state.status && state.status.last_checkpoint;
    const ckpt = lc ? lc.global_step : null;
    // checkpoints on a slow cycle, and at once when the daemon reports a new one
    const slow = state.tick % SLOW_EVERY === 0 || ckpt !== state.ckptShown;
    state.ckptShown = ckpt;
    const jobs = [refreshStatus(), loadMetrics(), api("/api/files").then(renderFiles)];
    if (slow) {
      jobs.push(api("/api/checkpoints").then(renderCheckpoints));
      jobs.push(api("/api/config").then(renderConfig));
      jobs.push(api("/api/compare").then(renderCompare));
    }
    const results = await Promise.allSettled(jobs);
    const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
    setProblems("poll", failed.length ? ["dashboard request failed: " + failed[0]] : []);
    state.tick++;
    document.body.dataset.polls = String(state.tick);
  }
  setTimeout(poll, POLL_MS);
}
poll();
