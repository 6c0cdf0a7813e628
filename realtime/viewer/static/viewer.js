"use strict";
// MindEye2 live viewer. Events from /events (Server-Sent Events): `hello` (title, history size, whether
// stimuli are served), `result` (one decoded trial, numbered n in arrival order), `summary` (session
// counts), `status` (service counters), `motion` (framewise displacement of volumes, from a scanner side
// that estimates head motion). One card per result, newest first; a latency plot and an FD plot (inline SVG).

const STAGES = ["receive", "journal", "glm", "queue", "decode", "generate", "publish"];
const STAGE_COLORS = {
  receive: "#7f8fa6", journal: "#4f9d9a", glm: "#59a14f", queue: "#edc948",
  decode: "#f28e2b", generate: "#b07aa1", publish: "#9c755f",
};
const E2E_COLOR = "#4cc9f0";
const LATE_COLOR = "#f4a261";
const SVG_NS = "http://www.w3.org/2000/svg";
const PLOT_HEIGHT = 240;
const PLOT_MARGIN = {left: 62, right: 14, top: 14, bottom: 40};

const MOTION_HEIGHT = 160;
const MOTION_HISTORY = 4096;

const state = {instance: null, history: 200, stimuli: false, results: new Map(),  // n -> result
               motion: [], fdThreshold: 0.5};  // motion: {session, run, index, fd_mm, params, over}, oldest first
const cards = document.getElementById("cards");
const plot = document.getElementById("latency-plot");
const motionPlot = document.getElementById("motion-plot");
let drawPending = false;

// ---- small DOM helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function formatMs(ms) {
  if (ms === null || ms === undefined) return "-";
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}

const isSkipped = (r) => r.flags.includes("skipped");
// The server decides (realtime/hits.py): true / false, or null when the trial does not count.
const isTop1Hit = (r) => r.top1_hit === true;
const SCORE_MEANING = "cosine similarity between the CLIP embedding predicted from the brain and the candidate's";

// ---- cards ----------------------------------------------------------------------------------------

function frame(kind, image, caption) {
  return el("figure", {class: `frame ${kind}`}, [image, el("figcaption", {}, [caption])]);
}

function picture(cls, src, alt) {
  return el("img", {class: cls, src, alt, loading: "lazy", decoding: "async"});
}

function placeholder(text) {
  return el("div", {class: "placeholder"}, [text]);
}

function seenFrame(r) {
  if (r.image_id === null) return frame("seen", placeholder("not known"), "seen");
  const image = state.stimuli ? picture("seen", `/stimulus/${r.image_id}.png`, `seen image ${r.image_id}`)
                              : placeholder(`#${r.image_id}`);
  return frame("seen", image, `seen #${r.image_id}`);
}

function candidates(r) {
  const list = el("ol", {class: "topk",
                         title: `retrieval among the candidate images, best first; score: ${SCORE_MEANING}`});
  r.top_k.forEach((candidate, rank) => {
    const hit = candidate.image_id === r.image_id;
    const thumb = state.stimuli
      ? picture("cand-img", `/stimulus/${candidate.image_id}.png`, `candidate ${candidate.image_id}`)
      : el("span", {class: "cand-id"}, [`#${candidate.image_id}`]);
    list.append(el("li", {class: hit ? "cand hit" : "cand", "data-image-id": candidate.image_id,
                          title: `#${candidate.image_id}: ${SCORE_MEANING}, ${candidate.score.toFixed(4)}`}, [
      thumb,
      el("span", {class: "cand-rank"}, [String(rank + 1)]),
      el("span", {class: "cand-score"}, [candidate.score.toFixed(3)]),
    ]));
  });
  return el("div", {class: "retrieval"}, [
    el("div", {class: "topk-head", title: `${SCORE_MEANING}: 1 = same direction, 0 = unrelated`},
       ["best candidates · score: cosine similarity of the predicted CLIP embedding"]),
    list,
  ]);
}

function buildCard(r) {
  const hit = isTop1Hit(r);
  const classes = ["card", ...r.flags.map((flag) => `is-${flag}`), ...(hit ? ["hit-top1"] : [])];
  const badges = el("span", {class: "badges"});
  if (hit) badges.append(el("span", {class: "flag flag-hit"}, ["top-1 hit"]));
  for (const flag of r.flags) badges.append(el("span", {class: `flag flag-${flag}`}, [flag]));

  const images = el("div", {class: "images"}, [seenFrame(r)]);
  if (r.image_url) images.append(frame("recon", picture("recon", r.image_url, "reconstruction"), "reconstruction"));
  if (r.lowlevel_url) images.append(frame("lowlevel", picture("lowlevel", r.lowlevel_url, "low-level"), "low-level"));
  if (!r.image_url && !r.lowlevel_url) {
    images.append(frame("recon", placeholder(isSkipped(r) ? "not decoded" : "no image"), "reconstruction"));
  }

  const sent = new Date(r.sent_unix_s * 1000).toLocaleTimeString();
  const norm = r.embedding_norm === null ? ""
    : ` · length of the predicted CLIP embedding ${r.embedding_norm.toFixed(1)}`;
  const card = el("article", {class: classes.join(" "), "data-n": r.n, "data-trial": r.trial, "data-run": r.run}, [
    el("header", {class: "card-head"}, [
      el("span", {class: "card-title"}, [`run ${r.run} · trial ${r.trial}`]),
      badges,
      el("span", {class: "card-e2e", title: "end-to-end latency"}, [formatMs(r.timings_ms.end_to_end)]),
    ]),
    images,
  ]);
  if (r.image_is_candidate === false) {  // its top-k cannot hold the seen image: say so, plainly
    card.append(el("p", {class: "not-candidate"}, [
      `The seen image #${r.image_id} is not among the retrieval candidates: no candidate below can be it.`]));
  }
  if (r.top_k.length) card.append(candidates(r));
  const foot = `${r.session} · decoded when volume ${r.volume_index} arrived${norm} · ${sent}`;
  card.append(el("footer", {class: "card-foot", title: foot}, [foot]));
  return card;
}

function addResult(r) {
  if (state.results.has(r.n)) return;  // sent again after a reconnect or a resync
  state.results.set(r.n, r);
  const card = buildCard(r);
  const older = [...cards.querySelectorAll("article.card")].find((c) => Number(c.dataset.n) < r.n);
  cards.insertBefore(card, older || null);
  while (state.results.size > state.history) {
    const oldest = Math.min(...state.results.keys());
    state.results.delete(oldest);
    cards.querySelector(`article.card[data-n="${oldest}"]`)?.remove();
  }
  document.getElementById("empty").hidden = true;
  scheduleDraw();
}

function clearResults() {
  state.results.clear();
  for (const card of cards.querySelectorAll("article.card")) card.remove();
  document.getElementById("empty").hidden = false;
  scheduleDraw();
}

// ---- header and status line -----------------------------------------------------------------------

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function applySummary(s) {
  setText("stat-session", s.session ?? "-");
  setText("stat-run", s.run ?? "-");
  setText("stat-trials", String(s.trials));
  setText("stat-skipped", String(s.skipped));
  setText("stat-late", String(s.late));
  setText("stat-top1", s.top1_rate === null ? "-"
    : `${(s.top1_rate * 100).toFixed(1)} % (${s.top1_hits} of ${s.top1_countable})`);
  document.getElementById("stat-top1").title = s.top1_text;
  setText("stat-p50", formatMs(s.end_to_end_p50_ms));
  setText("stat-p95", formatMs(s.end_to_end_p95_ms));
}

function applyStatus(status) {
  const line = document.getElementById("status");
  const entries = Object.entries(status);
  if (!entries.length) {
    line.textContent = "service status: none yet";
    return;
  }
  line.replaceChildren(...entries.map(([key, value]) => el("span", {class: "status-item", "data-key": key}, [
    el("b", {}, [key.replaceAll("_", " ")]),
    typeof value === "object" && value !== null ? JSON.stringify(value) : String(value),
  ])));
}

function setConnection(text, cls) {
  const badge = document.getElementById("connection");
  badge.textContent = text;
  badge.className = `connection ${cls}`;
}

// ---- latency plot ---------------------------------------------------------------------------------

function niceStep(maximum, ticks) {
  const rough = maximum / ticks;
  const power = 10 ** Math.floor(Math.log10(rough));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((step) => step >= rough);
}

function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  setTimeout(() => { drawPending = false; drawPlot(); drawMotion(); }, 50);
}

function drawLegend() {
  const legend = document.getElementById("legend");
  legend.replaceChildren(
    ...STAGES.map((stage) => el("li", {}, [el("i", {style: `background:${STAGE_COLORS[stage]}`}), stage])),
    el("li", {}, [el("i", {class: "line", style: `background:${E2E_COLOR}`}), "end-to-end"]),
    el("li", {}, [el("i", {class: "dot", style: `background:${LATE_COLOR}`}), "late"]));
}

function drawPlot() {
  const width = Math.max(plot.clientWidth, 400);
  const {left, right, top, bottom} = PLOT_MARGIN;
  const plotW = width - left - right, plotH = PLOT_HEIGHT - top - bottom;
  plot.setAttribute("viewBox", `0 0 ${width} ${PLOT_HEIGHT}`);
  const decoded = [...state.results.values()].filter((r) => !isSkipped(r)).sort((a, b) => a.n - b.n);
  const stageSum = (r) => STAGES.reduce((sum, stage) => sum + (r.timings_ms[stage] ?? 0), 0);
  const highest = Math.max(1, ...decoded.map((r) => Math.max(stageSum(r), r.timings_ms.end_to_end ?? 0)));
  const step = niceStep(highest, 5);
  const yMax = Math.ceil(highest / step) * step;
  const y = (ms) => top + plotH * (1 - ms / yMax);
  const nodes = [];

  for (let i = 0; i * step <= yMax * 1.0001; i++) {
    const tick = i * step;
    nodes.push(svg("line", {class: "grid", x1: left, x2: width - right, y1: y(tick), y2: y(tick)}));
    nodes.push(svg("text", {class: "tick y-tick", x: left - 6, y: y(tick) + 4, "text-anchor": "end"},
                   String(+tick.toFixed(2))));
  }
  nodes.push(svg("text", {class: "axis-label", transform: `translate(14 ${top + plotH / 2}) rotate(-90)`,
                          "text-anchor": "middle"}, "latency (ms)"));
  nodes.push(svg("text", {class: "axis-label", x: left + plotW / 2, y: PLOT_HEIGHT - 4, "text-anchor": "middle"},
                 "decoded trials, in arrival order (tick: trial number within its run; dashed line: a new run)"));
  if (!decoded.length) {
    nodes.push(svg("text", {class: "plot-empty", x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle"},
                   "no decoded trial yet"));
  }

  const slot = plotW / Math.max(decoded.length, 1);
  const barW = Math.max(1, Math.min(slot * 0.7, 40));
  const labelEvery = Math.ceil(decoded.length / Math.max(1, Math.floor(plotW / 44)));
  const e2ePoints = [];
  decoded.forEach((r, i) => {
    const centre = left + slot * (i + 0.5);
    const previous = decoded[i - 1];
    if (!previous || previous.run !== r.run || previous.session !== r.session) {  // trial numbers restart
      const x = left + slot * i;
      if (previous) nodes.push(svg("line", {class: "run-sep", x1: x, x2: x, y1: top, y2: top + plotH}));
      nodes.push(svg("text", {class: "run-label", x: x + 4, y: top + 10, "data-run": r.run}, `run ${r.run}`));
    }
    const bar = svg("g", {class: "bar", "data-n": r.n, "data-trial": r.trial});
    const detail = STAGES.filter((s) => s in r.timings_ms).map((s) => `${s} ${formatMs(r.timings_ms[s])}`);
    bar.append(svg("title", {}, `run ${r.run} trial ${r.trial}: end-to-end ${formatMs(r.timings_ms.end_to_end)}\n`
                                + detail.join("\n")));
    let base = 0;
    for (const stage of STAGES) {
      const ms = r.timings_ms[stage];
      if (!ms) continue;
      bar.append(svg("rect", {class: `stage stage-${stage}`, x: centre - barW / 2, y: y(base + ms), width: barW,
                              height: Math.max(0, y(base) - y(base + ms)), fill: STAGE_COLORS[stage]}));
      base += ms;
    }
    nodes.push(bar);
    if (i % labelEvery === 0) {
      nodes.push(svg("text", {class: "tick x-tick", x: centre, y: top + plotH + 14, "text-anchor": "middle"},
                     String(r.trial)));
    }
    if ("end_to_end" in r.timings_ms) e2ePoints.push([centre, y(r.timings_ms.end_to_end), r]);
  });
  if (e2ePoints.length > 1) {
    nodes.push(svg("polyline", {class: "e2e-line", fill: "none", stroke: E2E_COLOR,
                                points: e2ePoints.map(([px, py]) => `${px},${py}`).join(" ")}));
  }
  const radius = Math.max(1.5, Math.min(4, slot / 4));
  for (const [px, py, r] of e2ePoints) {
    const late = r.flags.includes("late");
    nodes.push(svg("circle", {class: late ? "e2e late" : "e2e", cx: px, cy: py, r: late ? radius + 1 : radius,
                              fill: late ? LATE_COLOR : E2E_COLOR, "data-n": r.n}));
  }
  nodes.push(svg("line", {class: "axis", x1: left, x2: left, y1: top, y2: top + plotH}));
  nodes.push(svg("line", {class: "axis", x1: left, x2: width - right, y1: top + plotH, y2: top + plotH}));
  plot.replaceChildren(...nodes);
}

// ---- head motion plot -----------------------------------------------------------------------------

function addMotion(data) {
  state.motion = data.snapshot ? data.points : state.motion.concat(data.points).slice(-MOTION_HISTORY);
  const s = data.summary;
  const summary = document.getElementById("motion-summary");
  if (s.volumes) {
    summary.textContent = `${s.volumes} volumes, largest FD ${s.fd_max_mm.toFixed(2)} mm, ${s.over} over `
                          + `${state.fdThreshold} mm`;
    summary.className = s.over ? "motion-summary flagged" : "motion-summary";
  }
  scheduleDraw();
}

function drawMotion() {
  const width = Math.max(motionPlot.clientWidth, 400);
  const {left, right, top} = PLOT_MARGIN, bottom = 28;
  const plotW = width - left - right, plotH = MOTION_HEIGHT - top - bottom;
  motionPlot.setAttribute("viewBox", `0 0 ${width} ${MOTION_HEIGHT}`);
  const points = state.motion;
  const highest = Math.max(state.fdThreshold * 2, ...points.map((p) => p.fd_mm));
  const step = niceStep(highest, 4);
  const yMax = Math.ceil(highest / step) * step;
  const y = (mm) => top + plotH * (1 - mm / yMax);
  const nodes = [];
  for (let i = 0; i * step <= yMax * 1.0001; i++) {
    nodes.push(svg("line", {class: "grid", x1: left, x2: width - right, y1: y(i * step), y2: y(i * step)}));
    nodes.push(svg("text", {class: "tick", x: left - 6, y: y(i * step) + 4, "text-anchor": "end"},
                   String(+(i * step).toFixed(2))));
  }
  nodes.push(svg("text", {class: "axis-label", transform: `translate(14 ${top + plotH / 2}) rotate(-90)`,
                          "text-anchor": "middle"}, "FD (mm)"));
  nodes.push(svg("text", {class: "axis-label", x: left + plotW / 2, y: MOTION_HEIGHT - 6, "text-anchor": "middle"},
                 `volumes in arrival order (red: framewise displacement over ${state.fdThreshold} mm)`));
  const slot = plotW / Math.max(points.length, 1);
  points.forEach((p, i) => {
    const previous = points[i - 1];
    if (!previous || previous.run !== p.run || previous.session !== p.session) {
      const x = left + slot * i;
      if (previous) nodes.push(svg("line", {class: "run-sep", x1: x, x2: x, y1: top, y2: top + plotH}));
      nodes.push(svg("text", {class: "run-label", x: x + 4, y: top + 10}, `run ${p.run}`));
    }
    const bar = svg("rect", {class: p.over ? "fd over" : "fd", x: left + slot * i + slot * 0.1, y: y(p.fd_mm),
                             width: Math.max(0.5, slot * 0.8), height: Math.max(0, y(0) - y(p.fd_mm)),
                             "data-run": p.run, "data-index": p.index});
    bar.append(svg("title", {}, `run ${p.run} volume ${p.index}: FD ${p.fd_mm.toFixed(3)} mm`));
    nodes.push(bar);
  });
  nodes.push(svg("line", {class: "threshold", x1: left, x2: width - right, y1: y(state.fdThreshold),
                          y2: y(state.fdThreshold)}));
  nodes.push(svg("line", {class: "axis", x1: left, x2: left, y1: top, y2: top + plotH}));
  nodes.push(svg("line", {class: "axis", x1: left, x2: width - right, y1: top + plotH, y2: top + plotH}));
  motionPlot.replaceChildren(...nodes);
}

// ---- the event stream -----------------------------------------------------------------------------

function connect() {
  const events = new EventSource("/events");
  events.onopen = () => setConnection("live", "live");
  events.onerror = () => setConnection("reconnecting", "connecting");
  events.addEventListener("hello", (e) => {
    const hello = JSON.parse(e.data);
    if (state.instance !== null && state.instance !== hello.instance) clearResults();  // the viewer restarted
    Object.assign(state, {instance: hello.instance, history: hello.history, stimuli: hello.stimuli,
                          fdThreshold: hello.fd_threshold_mm ?? state.fdThreshold});
    setText("title", hello.title);
    document.title = hello.title;
  });
  events.addEventListener("result", (e) => addResult(JSON.parse(e.data)));
  events.addEventListener("summary", (e) => applySummary(JSON.parse(e.data)));
  events.addEventListener("status", (e) => applyStatus(JSON.parse(e.data)));
  events.addEventListener("motion", (e) => addMotion(JSON.parse(e.data)));
}

drawLegend();
drawPlot();
drawMotion();
window.addEventListener("resize", scheduleDraw);
connect();
