// The clt viewer: attribution graphs (circuit-tracer's JSON) drawn as SVG nodes over a canvas of edges (a graph
// has up to hundreds of thousands of edges: as SVG elements they took ~10 s to draw), with feature dashboards.
// Vanilla JavaScript, no dependencies, no network beyond this server. Text from graph and feature files is
// only ever inserted with textContent, never as HTML.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const state = { graph: null, name: "", pinned: new Set(), features: false, labels: {},
  // The subgraph: supernodes ({label, ids}, circuit-tracer's `qParams.supernodes`), the pinned nodes ticked
  // for grouping, whether the graph came from the server's folder (then it can be saved there), and the
  // URL's `pinnedIds`/`supernodes` (Neuronpedia's link form), used once by the graph the URL names.
  supernodes: [], checked: new Set(), fromServer: false, urlQ: null,
  // Interventions (when the server has the model and transcoder): the edits to run, "L:P:F=V" strings.
  intervene: { available: false, edits: [] } };

// A node's label: the graph's own (clerp), else the feature's label from `clt explain`.
function labelOf(n) {
  if (n.clerp) return n.clerp;
  const f = featureOf(n);
  return f ? state.labels[`${f.layer}/${f.feature}`] || "" : "";
}

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function showError(msg) {
  const e = $("error");
  e.textContent = msg;
  e.hidden = false;
  document.body.dataset.state = "error";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function fetchJson(url) {
  const r = await fetch(url);
  const text = await r.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch (e) {
    throw new Error(`${url}: HTTP ${r.status}, not JSON`);
  }
  if (!r.ok) throw new Error(body && body.error ? body.error : `${url}: HTTP ${r.status}`);
  return body;
}

// ---- graph validation and model ----

function validateGraph(g) {
  if (g === null || typeof g !== "object" || Array.isArray(g)) throw new Error("the top level is not an object");
  if (!Array.isArray(g.nodes)) throw new Error("`nodes` is missing or not a list");
  if (!Array.isArray(g.links)) throw new Error("`links` is missing or not a list");
  const ids = new Set();
  g.nodes.forEach((n, i) => {
    if (n === null || typeof n !== "object") throw new Error(`node ${i} is not an object`);
    if (typeof n.node_id !== "string") throw new Error(`node ${i} has no string \`node_id\``);
    if (ids.has(n.node_id)) throw new Error(`node id ${n.node_id} appears twice`);
    ids.add(n.node_id);
  });
  g.links.forEach((l, i) => {
    if (l === null || typeof l !== "object") throw new Error(`link ${i} is not an object`);
    if (!ids.has(l.source)) throw new Error(`link ${i} starts at unknown node ${JSON.stringify(l.source)}`);
    if (!ids.has(l.target)) throw new Error(`link ${i} ends at unknown node ${JSON.stringify(l.target)}`);
    if (typeof l.weight !== "number" || !isFinite(l.weight)) throw new Error(`link ${i} has no numeric \`weight\``);
  });
}

function kindOf(n) {
  const t = (n.feature_type || "").toLowerCase();
  if (t === "embedding" || n.layer === "E") return "embedding";
  if (t === "logit") return "logit";
  if (t.includes("error")) return "error";
  return "feature";
}

function layerRank(n) {
  if (kindOf(n) === "embedding") return -1;
  const v = parseInt(n.layer, 10);
  return isNaN(v) ? 0 : v;
}

// Layer and feature index of a transcoder feature, from its node id "{layer}_{feature}_{pos}".
function featureOf(n) {
  if (kindOf(n) !== "feature") return null;
  const parts = String(n.node_id).split("_");
  if (parts.length !== 3) return null;
  const layer = parseInt(parts[0], 10), feature = parseInt(parts[1], 10);
  if (isNaN(layer) || isNaN(feature) || feature < 0) return null;
  return { layer, feature };
}

// ---- rendering ----

function clearGraph() {
  state.graph = null;
  const svg = $("graph");
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  svg.setAttribute("width", 0);
  svg.setAttribute("height", 0);
  const canvas = $("edge-canvas");
  canvas.width = 0;
  canvas.height = 0;
  canvas.dataset.drawn = "0";
  $("graph-title").textContent = "";
  state.supernodes = [];
  state.checked.clear();
  $("node-panel").replaceChildren(el("p", { class: "hint" }, "Hover a node to see it; click to pin it."));
  $("pinned-panel").replaceChildren();
  $("feature-panel").replaceChildren();
  $("intervene-panel").hidden = true;
}

function render(g, name) {
  clearGraph();
  const meta = g.metadata || {};
  const tokens = Array.isArray(meta.prompt_tokens) ? meta.prompt_tokens : [];
  const nodes = g.nodes, links = g.links;
  const byId = new Map(nodes.map((n) => [n.node_id, n]));
  const ranks = [...new Set(nodes.map(layerRank))].sort((a, b) => a - b);
  const rowOf = new Map(ranks.map((r, i) => [r, i]));
  let nCtx = tokens.length;
  for (const n of nodes) nCtx = Math.max(nCtx, (Number(n.ctx_idx) || 0) + 1);
  // Cells (row, position); each column is as wide as its most crowded cell.
  const cells = new Map();
  for (const n of nodes) {
    const key = `${rowOf.get(layerRank(n))}:${Number(n.ctx_idx) || 0}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const spacing = 14, left = 70, top = 20, bottom = 70;
  const pane = $("graph-pane");
  // Fill the pane when the graph is small; scroll when it is not.
  const rowH = Math.max(48, Math.floor((pane.clientHeight - 40 - top - bottom) / ranks.length));
  const colW = new Array(nCtx).fill(60);
  for (const [key, list] of cells) {
    const c = Number(key.split(":")[1]);
    colW[c] = Math.max(colW[c], list.length * spacing + 20);
  }
  const spare = pane.clientWidth - 30 - left - colW.reduce((a, b) => a + b, 0);
  if (spare > 0 && nCtx > 0) for (let c = 0; c < nCtx; c++) colW[c] += spare / nCtx;
  const colX = [];
  let x = left;
  for (let c = 0; c < nCtx; c++) { colX.push(x); x += colW[c]; }
  const width = x + 20, height = top + ranks.length * rowH + bottom;
  const pos = new Map();
  for (const [key, list] of cells) {
    const [r, c] = key.split(":").map(Number);
    list.sort((a, b) => (Number(b.influence) || 0) - (Number(a.influence) || 0) || (a.node_id < b.node_id ? -1 : 1));
    const x0 = colX[c] + (colW[c] - (list.length - 1) * spacing) / 2;
    list.forEach((n, i) => pos.set(n.node_id, { x: x0 + i * spacing, y: top + (ranks.length - 1 - r) * rowH + rowH / 2 }));
  }

  const svg = $("graph");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const grid = el("svg:g", { class: "grid" });
  ranks.forEach((r, i) => {
    const y = top + (ranks.length - 1 - i) * rowH + rowH / 2;
    grid.appendChild(el("svg:line", { class: "gridline", x1: left, x2: width - 10, y1: y, y2: y }));
    const label = r < 0 ? "Emb" : (nodes.some((n) => layerRank(n) === r && kindOf(n) === "logit") ? "Logit" : `L${r}`);
    grid.appendChild(el("svg:text", { class: "axis", x: 8, y: y + 4 }, label));
  });
  for (let c = 0; c < nCtx; c++) {
    const t = el("svg:text", { class: "axis", x: colX[c] + colW[c] / 2, y: height - bottom + 16, "text-anchor": "end",
      transform: `rotate(-40 ${colX[c] + colW[c] / 2} ${height - bottom + 16})` }, tokens[c] !== undefined ? String(tokens[c]) : String(c));
    grid.appendChild(t);
  }
  svg.appendChild(grid);

  const maxW = links.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 0) || 1;
  const edges = links.map((l) => ({ a: pos.get(l.source), b: pos.get(l.target), source: l.source, target: l.target,
    pos: l.weight >= 0, width: 0.4 + 3.6 * Math.abs(l.weight) / maxW }));
  const edgesOf = new Map(nodes.map((n) => [n.node_id, []]));
  edges.forEach((e, i) => {
    edgesOf.get(e.source).push(i);
    edgesOf.get(e.target).push(i);
  });
  // The hovered node's edges are drawn again, as SVG, above the canvas.
  svg.appendChild(el("svg:g", { id: "edges" }));

  const nodeLayer = el("svg:g", { id: "nodes" });
  const nodeEls = new Map();
  for (const n of nodes) {
    const p = pos.get(n.node_id), kind = kindOf(n);
    const shape = kind === "feature"
      ? el("svg:circle", { cx: p.x, cy: p.y, r: 5.5 })
      : el("svg:rect", { x: p.x - 5, y: p.y - 5, width: 10, height: 10 });
    shape.setAttribute("class", `node ${kind}`);
    shape.dataset.id = n.node_id;
    shape.addEventListener("mouseenter", (ev) => hover(n, ev, true));
    shape.addEventListener("mouseleave", (ev) => hover(n, ev, false));
    shape.addEventListener("click", () => togglePin(n));
    nodeLayer.appendChild(shape);
    nodeEls.set(n.node_id, shape);
  }
  svg.appendChild(nodeLayer);

  svg.appendChild(el("svg:g", { id: "supernodes" }));

  state.graph = { g, byId, edges, edgesOf, nodeEls, width, height, pos };
  state.name = name;
  const prompt = typeof meta.prompt === "string" ? meta.prompt : tokens.join("");
  $("graph-title").textContent = `${name}: ${nodes.length} nodes, ${links.length} edges. Prompt: ${prompt}`;
  // The file's subgraph, or the URL's when it names this graph.
  let q = g.qParams || {};
  if (state.urlQ && state.urlQ.graph === name && state.fromServer) q = state.urlQ;
  state.urlQ = null;
  let pins = q.pinnedIds || [];
  if (typeof pins === "string") pins = pins.split(",").filter(Boolean);
  for (const id of pins) if (byId.has(id)) state.pinned.add(id);
  for (const id of [...state.pinned]) if (!byId.has(id)) state.pinned.delete(id);
  state.supernodes = parseSupernodes(q.supernodes, byId);
  for (const s of state.supernodes) for (const id of s.ids) state.pinned.add(id);
  refreshPins();
  applySearch();
  state.intervene.edits = [];
  const result = $("intervene-result");
  if (result) result.replaceChildren();
  renderIntervene();
  // The prompt panel starts from the graph's prompt until one is typed.
  const typed = $("probe-prompt");
  if (typed && !typed.value && g.metadata && typeof g.metadata.prompt === "string") typed.value = g.metadata.prompt;
}

function describe(n) {
  const box = el("div");
  box.appendChild(el("h3", {}, n.node_id));
  const rows = [["type", n.feature_type], ["layer", n.layer], ["position", n.ctx_idx], ["label", labelOf(n)],
    ["activation", n.activation], ["influence", n.influence], ["token prob", n.token_prob]];
  for (const [k, v] of rows) {
    if (v === undefined || v === null || v === "") continue;
    box.appendChild(el("div", {}, `${k}: ${typeof v === "number" ? +v.toPrecision(4) : v}`));
  }
  if (state.graph) {
    const es = state.graph.edgesOf.get(n.node_id) || [];
    box.appendChild(el("div", {}, `edges: ${es.length}`));
  }
  const f = featureOf(n);
  const pos = Number(n.ctx_idx);
  if (f && state.intervene.available && Number.isInteger(pos)) {
    // Edits of this feature for the intervention panel (clt intervene's syntax).
    const bar = el("div", { class: "edit-buttons" });
    const act = typeof n.activation === "number" ? n.activation : 1;
    for (const [kind, text, edit] of [
      ["silence", "silence here", `${f.layer}:${pos}:${f.feature}=0`],
      ["double", "×2 here", `${f.layer}:${pos}:${f.feature}*=2`],
      ["flip", "flip here", `${f.layer}:${pos}:${f.feature}*=-1`],
      ["steer", "steer everywhere", `${f.layer}:*:${f.feature}=${+(2 * act).toPrecision(4)}`],
    ]) {
      const b = el("button", { type: "button", "data-edit-kind": kind, title: edit }, text);
      b.addEventListener("click", () => addEdit(edit));
      bar.appendChild(b);
    }
    box.appendChild(bar);
  }
  return box;
}

// ---- interventions ----

function addEdit(edit) {
  if (!state.intervene.edits.includes(edit)) state.intervene.edits.push(edit);
  renderIntervene();
}

// The intervention panel: the edits, the mode, how many tokens to generate, and the last result.
function renderIntervene() {
  const panel = $("intervene-panel");
  panel.hidden = !(state.intervene.available && state.graph);
  if (panel.hidden) return;
  const keep = $("intervene-result");
  const parts = [el("h3", {}, "Intervene")];
  const iv = state.intervene;
  if (iv.edits.length === 0) {
    parts.push(el("p", { class: "hint" }, "Add edits from a feature node (hover or click it), or type one: LAYER:POS:FEATURE=VALUE, *=FACTOR to scale, POS * for every position."));
  }
  const ul = el("ul", { class: "edit-list" });
  iv.edits.forEach((e, i) => {
    const li = el("li", {}, e);
    const rm = el("button", { type: "button", title: "remove" }, "×");
    rm.addEventListener("click", () => { iv.edits.splice(i, 1); renderIntervene(); });
    li.appendChild(rm);
    ul.appendChild(li);
  });
  parts.push(ul);
  const typed = el("input", { type: "text", id: "intervene-edit", placeholder: "3:7:118=0" });
  const add = el("button", { type: "button" }, "add");
  add.addEventListener("click", () => { if (typed.value.trim()) addEdit(typed.value.trim()); });
  const mode = el("select", { id: "intervene-mode" });
  for (const m of ["frozen-attention", "live", "replacement", "direct"]) mode.appendChild(el("option", { value: m }, m));
  mode.value = iv.mode || "frozen-attention";
  mode.addEventListener("change", () => { iv.mode = mode.value; });
  const gen = el("input", { type: "number", id: "intervene-generate", min: "0", max: String(iv.maxGenerate || 256),
    value: String(iv.generate === undefined ? 10 : iv.generate) });
  gen.addEventListener("change", () => { iv.generate = Number(gen.value) || 0; });
  const run = el("button", { type: "button", id: "intervene-run" }, "run");
  run.disabled = iv.edits.length === 0;
  run.addEventListener("click", runIntervention);
  const controls = el("div", { class: "intervene-controls" });
  controls.append(typed, add, el("label", {}, "mode "), mode, el("label", {}, "generate "), gen, run);
  parts.push(controls);
  parts.push(keep || el("div", { id: "intervene-result" }));
  panel.replaceChildren(...parts);
}

// POSTs `body` as JSON to `url`; the answer's JSON, or an Error with the server's message.
async function postJson(url, body) {
  const resp = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  const r = await resp.json();
  if (!resp.ok) throw new Error(r && r.error ? r.error : `HTTP ${resp.status}`);
  return r;
}

// "Features on a prompt" (POST /api/activations, `clt activations`): the strongest features at each
// position of any prompt, each a button that opens its dashboard, and each layer's error share there.
function renderPromptPanel() {
  const panel = $("prompt-panel");
  panel.hidden = !state.intervene.available;
  if (panel.hidden || panel.childElementCount) return;
  const box = promptRunner("probe", "prompted", "", (prompt) => ({ prompt, top: 3 }), (r) => {
    const shares = (r.layers || []).map((l) => (+l.error_share).toFixed(3)).join(" ");
    const rows = el("table", { class: "prompt-top" });
    (r.pieces || []).forEach((piece, p) => {
      if (p === 0) return;
      const cell = el("td");
      for (const f of r.top[p] || []) {
        const b = el("button", { type: "button", class: "feature-link", "data-feature": `${f.layer}/${f.feature}`,
          title: f.label || "" }, `${f.layer}:${f.feature} ${(+f.activation).toPrecision(3)}`);
        b.addEventListener("click", () => loadFeature(f.layer, f.feature, null));
        cell.appendChild(b);
      }
      const tr = el("tr");
      tr.append(el("td", { class: "pos" }, String(p)), el("td", { class: "piece" }, JSON.stringify(piece)), cell);
      rows.appendChild(tr);
    });
    return [[el("p", {}, `error share by layer: ${shares}`), rows], "done"];
  });
  panel.append(el("h3", {}, "Features on a prompt"), ...box);
}

// A prompt box that POSTs `request(prompt)` to /api/activations and shows `show(answer)`: `[elements,
// state]`. Its elements are `#${id}-prompt` (starting as `prompt`), `#${id}-run` and `#${id}-result`;
// `document.body.dataset[flag]` is "running", then "error" or `show`'s state (what the browser test waits on).
function promptRunner(id, flag, prompt, request, show) {
  const input = el("input", { type: "text", id: `${id}-prompt`, placeholder: "a prompt" });
  input.value = prompt;
  const run = el("button", { type: "button", id: `${id}-run` }, "run");
  const out = el("div", { id: `${id}-result` });
  run.addEventListener("click", async () => {
    document.body.dataset[flag] = "running";
    out.replaceChildren(el("p", { class: "hint" }, "running…"));
    let r;
    try {
      r = await postJson("/api/activations", request(input.value));
    } catch (e) {
      out.replaceChildren(el("p", { class: "feature-error" }, `Failed: ${e.message}`));
      document.body.dataset[flag] = "error";
      return;
    }
    const [parts, done] = show(r);
    out.replaceChildren(...parts);
    document.body.dataset[flag] = done;
  });
  input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") run.click(); });
  const controls = el("div", { class: "intervene-controls" });
  controls.append(input, run);
  return [controls, out];
}

function topList(title, top) {
  const col = el("div");
  col.appendChild(el("div", {}, title));
  const ol = el("ol");
  for (const t of top) ol.appendChild(el("li", {}, `${JSON.stringify(t.text)} ${(+t.prob).toPrecision(3)}`));
  col.appendChild(ol);
  return col;
}

async function runIntervention() {
  const iv = state.intervene;
  const out = $("intervene-result");
  const meta = (state.graph && state.graph.g.metadata) || {};
  if (typeof meta.prompt !== "string") {
    out.replaceChildren(el("p", { class: "feature-error" }, "This graph's metadata has no prompt to intervene on."));
    document.body.dataset.intervened = "error";
    return;
  }
  document.body.dataset.intervened = "running";
  out.replaceChildren(el("p", { class: "hint" }, "running…"));
  const body = { prompt: meta.prompt, edits: iv.edits, mode: iv.mode || "frozen-attention",
    generate: iv.generate === undefined ? 10 : iv.generate, top: 5 };
  let r;
  try {
    r = await postJson("/api/intervene", body);
  } catch (e) {
    out.replaceChildren(el("p", { class: "feature-error" }, `Intervention failed: ${e.message}`));
    document.body.dataset.intervened = "error";
    return;
  }
  const box = el("div", { class: "logits" });
  box.append(topList("clean", r.clean_top || []), topList("with the edits", r.top || []));
  const parts = [el("h3", {}, `Result (${r.mode})`), box];
  if ((r.continuation.tokens || []).length) {
    parts.push(el("div", {}, "clean continuation"), el("div", { class: "cont" }, r.clean_continuation.text));
    parts.push(el("div", {}, "with the edits"), el("div", { class: "cont" }, r.continuation.text));
  }
  out.replaceChildren(...parts);
  document.body.dataset.intervened = "done";
}

function hover(n, ev, on) {
  const layer = $("edges");
  if (layer) {
    layer.replaceChildren();
    if (on) {
      for (const i of state.graph.edgesOf.get(n.node_id) || []) {
        const e = state.graph.edges[i];
        layer.appendChild(el("svg:line", { class: `edge hot ${e.pos ? "pos" : "neg"}`, x1: e.a.x, y1: e.a.y,
          x2: e.b.x, y2: e.b.y, "stroke-width": e.width.toFixed(2) }));
      }
    }
  }
  const tip = $("tooltip");
  if (on) {
    tip.textContent = labelOf(n) ? `${n.node_id}: ${labelOf(n)}` : n.node_id;
    const pane = $("graph-pane").getBoundingClientRect();
    tip.style.left = `${ev.clientX - pane.left + $("graph-pane").scrollLeft + 12}px`;
    tip.style.top = `${ev.clientY - pane.top + $("graph-pane").scrollTop + 12}px`;
    tip.hidden = false;
    $("node-panel").replaceChildren(describe(n));
  } else {
    tip.hidden = true;
  }
}

function togglePin(n) {
  if (state.pinned.has(n.node_id)) unpin(n.node_id);
  else {
    state.pinned.add(n.node_id);
    const f = featureOf(n);
    if (f) loadFeature(f.layer, f.feature, n);
  }
  $("node-panel").replaceChildren(describe(n));
  refreshPins();
}

// Draws `edges` ({a, b, pos, width}: end points, sign, stroke width) on the canvas under the nodes: one path
// per colour and width class, so even hundreds of thousands of edges draw in a fraction of a second. The
// canvas says how many it drew.
function drawEdges(edges) {
  const { width, height } = state.graph;
  const canvas = $("edge-canvas");
  // Device pixels, within the browser's largest canvas side.
  const scale = Math.min(window.devicePixelRatio || 1, 32000 / Math.max(width, 1), 32000 / Math.max(height, 1));
  canvas.width = Math.ceil(width * scale);
  canvas.height = Math.ceil(height * scale);
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(scale, 0, 0, scale, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.globalAlpha = 0.35;
  ctx.lineCap = "round";
  const classes = 8, paths = new Map();
  let drawn = 0;
  for (const e of edges) {
    const c = Math.min(classes - 1, Math.floor((e.width - 0.4) / 3.6 * classes));
    const key = `${e.pos ? 1 : 0}:${c}`;
    if (!paths.has(key)) paths.set(key, new Path2D());
    const p = paths.get(key);
    p.moveTo(e.a.x, e.a.y);
    p.lineTo(e.b.x, e.b.y);
    drawn += 1;
  }
  for (const [key, p] of paths) {
    const [pos, c] = key.split(":").map(Number);
    ctx.strokeStyle = pos ? "#2166ac" : "#b2182b";
    ctx.lineWidth = 0.4 + 3.6 * (c + 0.5) / classes;
    ctx.stroke(p);
  }
  canvas.dataset.drawn = String(drawn);
}

function unpin(id) {
  state.pinned.delete(id);
  state.checked.delete(id);
  for (const s of state.supernodes) s.ids = s.ids.filter((x) => x !== id);
  state.supernodes = state.supernodes.filter((s) => s.ids.length > 0);
}

// ---- the subgraph: pinned nodes and supernodes ----

// Supernodes from `qParams.supernodes` (lists [label, node id, ...], or that list as a JSON string, as in
// Neuronpedia's URLs), keeping this graph's nodes, each node in its first group only.
function parseSupernodes(v, byId) {
  if (typeof v === "string") {
    try { v = JSON.parse(v); } catch (e) { return []; }
  }
  if (!Array.isArray(v)) return [];
  const out = [], seen = new Set();
  for (const g of v) {
    if (!Array.isArray(g) || typeof g[0] !== "string") continue;
    const ids = g.slice(1).filter((id) => typeof id === "string" && byId.has(id) && !seen.has(id));
    ids.forEach((id) => seen.add(id));
    if (ids.length) out.push({ label: g[0], ids });
  }
  return out;
}

// The subgraph's units: each supernode ("s0", "s1", ...) and each pinned node outside them (its id).
function unitOf(id) {
  const i = state.supernodes.findIndex((s) => s.ids.includes(id));
  return i >= 0 ? `s${i}` : id;
}

function unitName(u) {
  const m = /^s(\d+)$/.exec(u);
  if (m && state.supernodes[Number(m[1])]) return state.supernodes[Number(m[1])].label;
  const n = state.graph.byId.get(u);
  return n && labelOf(n) ? `${u}: ${labelOf(n)}` : u;
}

// The edges between the subgraph's units: each link between two pinned nodes of different units, summed
// per (source unit, target unit). A link's weight is its target's direct input from its source, so the sum
// is what the source unit's nodes put into the target unit's nodes altogether; links inside a supernode drop.
function unitEdges() {
  const unit = new Map([...state.pinned].map((id) => [id, unitOf(id)]));
  const sums = new Map();
  for (const l of state.graph.g.links) {
    const a = unit.get(l.source), b = unit.get(l.target);
    if (a === undefined || b === undefined || a === b) continue;
    const key = `${a}\u0000${b}`;
    sums.set(key, (sums.get(key) || 0) + l.weight);
  }
  return [...sums].map(([key, weight]) => {
    const [source, target] = key.split("\u0000");
    return { source, target, weight };
  });
}

// Where a unit is drawn in the pinned subgraph: its node, or the middle of its supernode's nodes.
function unitPos(u) {
  const m = /^s(\d+)$/.exec(u);
  if (!m) return state.graph.pos.get(u);
  const ps = state.supernodes[Number(m[1])].ids.map((id) => state.graph.pos.get(id));
  return { x: ps.reduce((a, p) => a + p.x, 0) / ps.length, y: ps.reduce((a, p) => a + p.y, 0) / ps.length };
}

function groupChecked() {
  const ids = [...state.pinned].filter((id) => state.checked.has(id) && unitOf(id) === id);
  if (ids.length === 0) return;
  const typed = $("group-label").value.trim();
  state.supernodes.push({ label: typed || `group ${state.supernodes.length + 1}`, ids });
  state.checked.clear();
  refreshPins();
}

// Writes the subgraph into the graph's file on the server (circuit-tracer's POST /save_graph/{slug}).
async function saveSubgraph() {
  const g = state.graph.g, out = $("save-status");
  const q = withSubgraph(g).qParams;
  document.body.dataset.saved = "running";
  out.textContent = "saving…";
  try {
    const r = await postJson(`/save_graph/${encodeURIComponent(state.name.replace(/\.json$/, ""))}`, { qParams: q });
    g.qParams = q;
    out.textContent = `saved to ${r.saved}: ${r.pinned} pinned, ${r.supernodes} supernodes`;
    document.body.dataset.saved = "done";
  } catch (e) {
    out.textContent = `Not saved: ${e.message}`;
    document.body.dataset.saved = "error";
  }
}

// The graph with its subgraph in `qParams`.
function withSubgraph(g) {
  const q = Object.assign({}, g.qParams || {}, { pinnedIds: [...state.pinned],
    supernodes: state.supernodes.map((s) => [s.label, ...s.ids]) });
  return Object.assign({}, g, { qParams: q });
}

// The graph with its subgraph, downloaded under its own name (a graph opened from disk).
function downloadSubgraph() {
  const blob = new Blob([JSON.stringify(withSubgraph(state.graph.g))], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: state.name });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// The page's address names the graph and its subgraph (Neuronpedia's pinnedIds and supernodes), so a
// link opens the same view.
function updateUrl() {
  if (!state.fromServer) return;
  const p = new URLSearchParams({ graph: state.name });
  if (state.pinned.size) p.set("pinnedIds", [...state.pinned].join(","));
  if (state.supernodes.length) p.set("supernodes", JSON.stringify(state.supernodes.map((s) => [s.label, ...s.ids])));
  history.replaceState(null, "", `?${p}`);
}

function describeUnit(u, edges) {
  const box = el("div");
  const s = state.supernodes[Number(u.slice(1))];
  box.appendChild(el("h3", {}, `Supernode: ${s.label}`));
  const ul = el("ul", { class: "pin-list" });
  for (const id of s.ids) ul.appendChild(el("li", {}, unitName(id)));
  box.appendChild(ul);
  for (const e of edges.filter((e) => e.source === u || e.target === u)) {
    box.appendChild(el("div", {}, e.source === u ? `→ ${unitName(e.target)}: ${+e.weight.toPrecision(4)}`
      : `← ${unitName(e.source)}: ${+e.weight.toPrecision(4)}`));
  }
  return box;
}

function refreshPins() {
  if (!state.graph) return;
  const { nodeEls, byId } = state.graph;
  for (const [id, e] of nodeEls) e.classList.toggle("pinned", state.pinned.has(id));
  const only = $("pinned-only").checked && state.pinned.size > 0;
  const grouped = new Set(state.supernodes.flatMap((s) => s.ids));
  // The pinned subgraph shows each supernode as one box over its nodes' middle, and the units' summed edges.
  for (const [id, e] of nodeEls) e.classList.toggle("hidden", only && (!state.pinned.has(id) || grouped.has(id)));
  const ue = unitEdges();
  const layer = $("supernodes");
  layer.replaceChildren();
  if (only) {
    const maxW = ue.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 0) || 1;
    drawEdges(ue.map((e) => ({ a: unitPos(e.source), b: unitPos(e.target), pos: e.weight >= 0,
      width: 0.4 + 3.6 * Math.abs(e.weight) / maxW })));
    state.supernodes.forEach((s, i) => {
      const p = unitPos(`s${i}`), w = 12 + 6.5 * s.label.length;
      const box = el("svg:g", { class: "supernode", "data-unit": `s${i}` });
      box.append(el("svg:rect", { x: p.x - w / 2, y: p.y - 10, width: w, height: 20, rx: 6 }),
        el("svg:text", { x: p.x, y: p.y + 4, "text-anchor": "middle" }, s.label),
        el("svg:title", {}, s.ids.join(", ")));
      box.addEventListener("click", () => $("node-panel").replaceChildren(describeUnit(`s${i}`, ue)));
      layer.appendChild(box);
    });
  } else {
    drawEdges(state.graph.edges);
  }
  updateUrl();
  const panel = $("pinned-panel");
  panel.replaceChildren();
  if (state.pinned.size === 0) return;
  panel.appendChild(el("h3", {}, `Subgraph: ${state.pinned.size} pinned, ${state.supernodes.length} supernodes`));
  const groups = el("ul", { class: "supernode-list" });
  state.supernodes.forEach((s, i) => {
    const li = el("li", { class: "supernode-item" }, `${s.label} (${s.ids.length}): ${s.ids.join(", ")}`);
    const rm = el("button", { type: "button", title: "ungroup", class: "ungroup" }, "×");
    rm.addEventListener("click", () => { state.supernodes.splice(i, 1); refreshPins(); });
    li.appendChild(rm);
    groups.appendChild(li);
  });
  panel.appendChild(groups);
  const ul = el("ul", { class: "pin-list" });
  for (const id of state.pinned) {
    if (grouped.has(id)) continue;
    const n = byId.get(id);
    const li = el("li");
    const box = el("input", { type: "checkbox", class: "group-check", "data-id": id });
    box.checked = state.checked.has(id);
    box.addEventListener("change", () => { if (box.checked) state.checked.add(id); else state.checked.delete(id); });
    const text = el("span", {}, labelOf(n) ? `${id}: ${labelOf(n)}` : id);
    text.addEventListener("click", () => {
      $("node-panel").replaceChildren(describe(n));
      const f = featureOf(n);
      if (f) loadFeature(f.layer, f.feature, n);
    });
    li.append(box, text);
    ul.appendChild(li);
  }
  panel.appendChild(ul);
  const controls = el("div", { class: "intervene-controls" });
  const make = el("button", { type: "button", id: "group-make" }, "group ticked");
  make.addEventListener("click", groupChecked);
  controls.append(el("input", { type: "text", id: "group-label", placeholder: "supernode label" }), make);
  panel.appendChild(controls);
  const inside = state.graph.g.links.filter((l) => state.pinned.has(l.source) && state.pinned.has(l.target));
  panel.appendChild(el("div", {}, `${inside.length} edges among pinned nodes`));
  if (ue.length) {
    // The strongest summed edges between units, as the pinned subgraph draws them.
    const table = el("table", { id: "unit-edges", class: "prompt-top" });
    for (const e of [...ue].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 15)) {
      const tr = el("tr", { "data-source": e.source, "data-target": e.target, "data-weight": String(e.weight) });
      tr.append(el("td", {}, unitName(e.source)), el("td", {}, "→"), el("td", {}, unitName(e.target)),
        el("td", { class: e.weight >= 0 ? "pos" : "neg" }, String(+e.weight.toPrecision(4))));
      table.appendChild(tr);
    }
    panel.appendChild(table);
  }
  const row = el("div", { class: "intervene-controls" });
  if (state.fromServer) {
    const save = el("button", { type: "button", id: "save-subgraph" }, `save into ${state.name}`);
    save.addEventListener("click", saveSubgraph);
    row.append(save, el("span", { id: "save-status" }));
  } else {
    // A graph opened from disk is not in the server's folder: it is handed back as a file instead.
    const down = el("button", { type: "button", id: "download-subgraph" }, `download ${state.name} with it`);
    down.addEventListener("click", downloadSubgraph);
    row.append(down);
  }
  panel.appendChild(row);
}

function applySearch() {
  if (!state.graph) return;
  const q = $("search").value.trim().toLowerCase();
  let hits = 0;
  for (const [id, e] of state.graph.nodeEls) {
    const n = state.graph.byId.get(id);
    const hay = `${id} ${labelOf(n)} ${n.feature_type || ""}`.toLowerCase();
    const hit = q !== "" && hay.includes(q);
    hits += hit ? 1 : 0;
    e.classList.toggle("match", hit);
    e.classList.toggle("dim", q !== "" && !hit);
  }
  $("status").textContent = q ? `${hits} matching nodes` : "";
}

// ---- feature dashboards ----

function histogram(rec) {
  const h = rec.histogram || [], edges = rec.histogram_edges || [];
  const w = 380, ht = 90;
  const svg = el("svg:svg", { width: w, height: ht + 18, class: "histogram" });
  if (h.length === 0) return svg;
  const max = Math.max(...h) || 1, bw = w / h.length;
  h.forEach((c, i) => {
    const bh = (ht * c) / max;
    const r = el("svg:rect", { x: i * bw, y: ht - bh, width: Math.max(bw - 1, 1), height: bh, fill: "#f4a442" });
    r.appendChild(el("svg:title", {}, `${edges[i] !== undefined ? (+edges[i]).toPrecision(3) : i}..${edges[i + 1] !== undefined ? (+edges[i + 1]).toPrecision(3) : ""}: ${c}`));
    svg.appendChild(r);
  });
  if (edges.length) {
    svg.appendChild(el("svg:text", { class: "axis", x: 0, y: ht + 14 }, (+edges[0]).toPrecision(2)));
    svg.appendChild(el("svg:text", { class: "axis", x: w, y: ht + 14, "text-anchor": "end" }, (+edges[edges.length - 1]).toPrecision(2)));
  }
  return svg;
}

function contextEl(ex, actMax) {
  const div = el("div", { class: "context" });
  (ex.tokens || []).forEach((t, i) => {
    const a = (ex.tokens_acts_list || [])[i] || 0;
    const s = el("span", { class: i === ex.train_token_ind ? "tok center" : "tok" }, t);
    if (a > 0 && actMax > 0) s.style.backgroundColor = `rgba(255, 140, 0, ${Math.min(1, a / actMax).toFixed(3)})`;
    s.title = `activation ${(+a).toPrecision(3)}`;
    div.appendChild(s);
  });
  return div;
}

async function loadFeature(layer, feature, node) {
  const panel = $("feature-panel");
  document.body.dataset.feature = "";
  panel.replaceChildren(el("h3", {}, `Layer ${layer}, feature ${feature}`), el("p", { class: "hint" }, "loading…"));
  if (!state.features) {
    panel.replaceChildren(el("h3", {}, `Layer ${layer}, feature ${feature}`),
      el("p", { class: "hint" }, "No feature dashboards: start clt serve with --features DIR."));
    if (state.intervene.available) panel.appendChild(testOnText(layer, feature, 0));
    return;
  }
  let rec;
  try {
    rec = await fetchJson(`/api/features/${layer}/${feature}`);
  } catch (e) {
    panel.replaceChildren(el("h3", {}, `Layer ${layer}, feature ${feature}`), el("p", { class: "feature-error" }, e.message));
    return;
  }
  const parts = [el("h3", {}, `Layer ${layer}, feature ${feature}`)];
  if (rec.label) parts.push(el("p", { class: "label" }, rec.label));
  else if (node && node.clerp) parts.push(el("p", { class: "label" }, node.clerp));
  parts.push(el("p", {}, `Fires on ${(100 * (rec.activation_frequency || 0)).toPrecision(3)}% of ${rec.n_tokens || "?"} tokens; ` +
    `activations ${(+rec.act_min).toPrecision(3)} to ${(+rec.act_max).toPrecision(3)}.`));
  parts.push(el("h3", {}, "Activation histogram"), histogram(rec));
  if ((rec.top_logits || []).length || (rec.bottom_logits || []).length) {
    parts.push(el("h3", {}, "Logit effects"));
    const box = el("div", { class: "logits" });
    for (const [key, cls, title] of [["top_logits", "pos", "promotes"], ["bottom_logits", "neg", "suppresses"]]) {
      const col = el("div");
      col.appendChild(el("div", {}, title));
      const ol = el("ol", { class: cls });
      const vals = rec[key.replace("logits", "logit_values")] || [];
      rec[key].forEach((t, i) => ol.appendChild(el("li", {}, vals[i] !== undefined ? `${JSON.stringify(t)} ${(+vals[i]).toPrecision(3)}` : JSON.stringify(t))));
      col.appendChild(ol);
      box.appendChild(col);
    }
    parts.push(box);
  }
  for (const q of rec.examples_quantiles || []) {
    if (!(q.examples || []).length) continue;
    const sec = el("section", { class: "quantile" });
    sec.appendChild(el("h3", {}, q.quantile_name));
    for (const ex of q.examples) sec.appendChild(contextEl(ex, rec.act_max));
    parts.push(sec);
  }
  if (state.intervene.available) parts.push(testOnText(layer, feature, rec.act_max));
  panel.replaceChildren(...parts);
  document.body.dataset.feature = `${layer}/${feature}`;
}

// The feature run on a text of one's own (POST /api/activations, `clt activations --feature L:F`): the
// prompt's tokens shaded by its activation (scaled to `actMax`, the dashboards' largest, when known).
function testOnText(layer, feature, actMax) {
  const sec = el("section", { id: "test-text" });
  sec.appendChild(el("h3", {}, "Test on text"));
  const meta = (state.graph && state.graph.g.metadata) || {};
  const prompt = typeof meta.prompt === "string" ? meta.prompt : "";
  const request = (p) => ({ prompt: p, features: [`${layer}:${feature}`], top: 0 });
  sec.append(...promptRunner("test", "tested", prompt, request, (r) => {
    const t = r.traces[0], acts = t.activation, pieces = r.pieces || [];
    const max = Math.max(0, ...acts);
    const scale = actMax > 0 ? actMax : max;
    const fired = acts.filter((a) => a > 0).length;
    const div = el("div", { class: "context" });
    pieces.forEach((piece, i) => {
      const a = acts[i] || 0;
      const sp = el("span", { class: i === 0 ? "tok special" : "tok" }, piece);
      if (a > 0 && scale > 0) sp.style.backgroundColor = `rgba(255, 140, 0, ${Math.min(1, a / scale).toFixed(3)})`;
      sp.title = i === 0 ? "position 0 keeps no features" :
        `activation ${(+a).toPrecision(3)}, pre-activation ${(+t.pre[i]).toPrecision(3)} (θ ${(+t.threshold).toPrecision(3)})`;
      div.appendChild(sp);
    });
    const says = `Fires at ${fired} of ${Math.max(pieces.length - 1, 0)} positions` + (fired ? `, most ${max.toPrecision(3)}.` : ".");
    return [[el("p", {}, says), div], String(fired)];
  }));
  return sec;
}

// ---- loading ----

function loadGraphText(text, name, fromServer) {
  state.fromServer = fromServer === true;
  let g;
  try {
    g = JSON.parse(text);
    validateGraph(g);
  } catch (e) {
    clearGraph();
    showError(`${name} is not a valid attribution graph: ${e.message}`);
    return;
  }
  try {
    clearError();
    const t0 = performance.now();
    render(g, name);
    // How long the page took to lay out and draw the graph (read by the browser test).
    document.body.dataset.renderMs = String(Math.round(performance.now() - t0));
    document.body.dataset.readyAt = String(Math.round(performance.now()));
    document.body.dataset.state = "ready";
  } catch (e) {
    clearGraph();
    showError(`${name} could not be drawn: ${e.message}`);
  }
}

async function loadGraphByName(name) {
  document.body.dataset.state = "loading";
  clearError();
  $("graph-select").value = name;
  let text;
  try {
    const t0 = performance.now();
    const r = await fetch(`/api/graphs/${encodeURIComponent(name)}`);
    text = await r.text();
    document.body.dataset.fetchMs = String(Math.round(performance.now() - t0));
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { msg = JSON.parse(text).error || msg; } catch (e) { /* keep the status */ }
      throw new Error(msg);
    }
  } catch (e) {
    clearGraph();
    showError(`Could not load ${name}: ${e.message}`);
    return;
  }
  loadGraphText(text, name, true);
}

async function init() {
  $("search").addEventListener("input", applySearch);
  $("pinned-only").addEventListener("change", refreshPins);
  $("clear-pins").addEventListener("click", () => {
    state.pinned.clear();
    state.supernodes = [];
    state.checked.clear();
    refreshPins();
  });
  $("graph-select").addEventListener("change", (ev) => {
    const name = ev.target.value;
    if (!name) return;
    history.replaceState(null, "", `?graph=${encodeURIComponent(name)}`);
    loadGraphByName(name);
  });
  $("file-input").addEventListener("change", (ev) => {
    const f = ev.target.files && ev.target.files[0];
    if (!f) return;
    document.body.dataset.state = "loading";
    const reader = new FileReader();
    reader.onload = () => loadGraphText(String(reader.result), f.name);
    reader.onerror = () => showError(`Could not read ${f.name}`);
    reader.readAsText(f);
  });
  let list = [];
  try {
    list = await fetchJson("/api/graphs");
    for (const g of list) $("graph-select").appendChild(el("option", { value: g.name }, g.name));
  } catch (e) {
    showError(`Could not list the graphs: ${e.message}`);
  }
  try {
    await fetchJson("/api/features");
    state.features = true;
    state.labels = (await fetchJson("/api/labels")).labels || {};
  } catch (e) {
    state.features = false;
  }
  try {
    const info = await fetchJson("/api/intervene");
    state.intervene.available = info.available === true;
    state.intervene.maxGenerate = info.max_generate;
  } catch (e) {
    state.intervene.available = false;
  }
  renderPromptPanel();
  const url = new URLSearchParams(location.search);
  const want = url.get("graph") || (list[0] && list[0].name);
  if (url.has("pinnedIds") || url.has("supernodes")) {
    state.urlQ = { graph: want, pinnedIds: url.get("pinnedIds") || "", supernodes: url.get("supernodes") || "[]" };
  }
  if (want) await loadGraphByName(want);
  else if (document.body.dataset.state !== "error") document.body.dataset.state = "empty";
}

window.addEventListener("error", (ev) => showError(`Viewer error: ${ev.message}`));
init();
