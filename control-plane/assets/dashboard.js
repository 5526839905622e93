// capmesh dashboard: reads /dashboard/api/mesh every two seconds and draws the mesh graph,
// the instances and the recent traces; a trace's tree is drawn from its spans' parent links.
// Everything shown is set as text (never parsed as HTML).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
// A trace named in the address (#trace=<id>) is opened at once; else the newest is shown.
let selected = new URLSearchParams(location.hash.slice(1)).get("trace");
let opened = false;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function ms(nanos) {
  const v = nanos / 1e6;
  return v >= 100 ? v.toFixed(0) + " ms" : v.toFixed(2) + " ms";
}

function shortAgent(identity) {
  const parts = String(identity || "").split("/");
  return parts[parts.length - 1];
}

function drawGraph(mesh) {
  const box = document.getElementById("graph");
  const consumers = [...new Set(mesh.edges.map((e) => e.from))].sort();
  for (const a of mesh.agents) {
    if (a.provides.length === 0 && !consumers.includes(a.name)) consumers.push(a.name);
  }
  const caps = mesh.capabilities.map((c) => c.name).sort();
  const providers = [];
  for (const c of mesh.capabilities) {
    for (const p of c.providers) {
      const key = p.agent + "#" + p.instance;
      if (!providers.some((q) => q.key === key)) providers.push({ key, agent: p.agent, instance: p.instance });
    }
  }
  providers.sort((a, b) => a.key.localeCompare(b.key));
  const rows = Math.max(consumers.length, caps.length, providers.length, 1);
  const rowH = 58, top = 20, width = 1100, nodeW = 190, nodeH = 40;
  const height = top * 2 + rows * rowH;
  const colX = [20, width / 2 - nodeW / 2, width - nodeW - 20];
  const y = (i, n) => top + (rows - n) * rowH / 2 + i * rowH;
  const pos = new Map();
  consumers.forEach((n, i) => pos.set("a:" + n, { x: colX[0], y: y(i, consumers.length) }));
  caps.forEach((n, i) => pos.set("c:" + n, { x: colX[1], y: y(i, caps.length) }));
  providers.forEach((p, i) => pos.set("p:" + p.key, { x: colX[2], y: y(i, providers.length) }));

  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "mesh graph" });
  const edges = svg("g");
  const labels = svg("g");
  root.append(edges);
  const path = (from, to, cls) => {
    const x1 = from.x + nodeW, y1 = from.y + nodeH / 2, x2 = to.x, y2 = to.y + nodeH / 2;
    const mx = (x1 + x2) / 2;
    edges.append(svg("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, class: cls }));
    return { x: mx, y: (y1 + y2) / 2 };
  };
  for (const e of mesh.edges) {
    const from = pos.get("a:" + e.from), to = pos.get("c:" + e.capability);
    if (!from || !to) continue;
    const cls = "edge" + (e.live && e.rate_per_s > 0 ? " live" : "") + (e.error_rate > 0 ? " errors" : "");
    path(from, to, cls);
    // Beside the capability it reaches, so that labels of one consumer do not overlap.
    const mid = { x: to.x - 120, y: to.y + nodeH / 2 };
    const p99 = e.p99_ms === undefined ? "–" : e.p99_ms + " ms";
    const text = e.live
      ? `${e.rate_per_s.toFixed(1)}/s · ${(e.error_rate * 100).toFixed(1)}% err · p99 ${p99}`
      : "idle (seen in traces)";
    const label = svg("text", { x: mid.x, y: mid.y - 4, "text-anchor": "middle", class: "edge-label" }, text);
    label.dataset.edge = e.from + "→" + e.capability;
    label.dataset.rate = String(e.rate_per_s);
    labels.append(label);
  }
  for (const c of mesh.capabilities) {
    for (const p of c.providers) {
      const from = pos.get("c:" + c.name), to = pos.get("p:" + p.agent + "#" + p.instance);
      if (!from || !to) continue;
      const state = !p.healthy ? " unhealthy" : p.ejected_by.length ? " ejected" : "";
      path(from, to, "edge provider" + state);
    }
  }
  root.append(labels);
  const node = (key, kind, title, sub) => {
    const p = pos.get(key);
    const g = svg("g", { class: "node " + kind, transform: `translate(${p.x},${p.y})` });
    g.append(svg("rect", { width: nodeW, height: nodeH }));
    g.append(svg("text", { x: 10, y: 17 }, title));
    g.append(svg("text", { x: 10, y: 32, class: "sub" }, sub));
    root.append(g);
  };
  consumers.forEach((n) => node("a:" + n, "agent", n, "agent"));
  caps.forEach((n) => node("c:" + n, "capability", n, "capability"));
  for (const p of providers) {
    const info = mesh.capabilities.flatMap((c) => c.providers).find((q) => q.agent + "#" + q.instance === p.key);
    const health = !info ? "" : !info.healthy ? "unhealthy" : info.ejected_by.length ? "ejected by " + info.ejected_by.join(", ") : "healthy";
    node("p:" + p.key, "agent", p.agent, p.instance + " · " + health);
  }
  box.replaceChildren(root);
}

function drawAgents(mesh) {
  const body = document.querySelector("#agents tbody");
  const rows = [];
  for (const a of mesh.agents) {
    for (const i of a.instances) {
      const tr = el("tr");
      tr.append(el("td", {}, a.name), el("td", {}, i.proxy_id));
      const health = i.healthy ? "healthy" : "unhealthy" + (i.detail ? ": " + i.detail : "");
      tr.append(el("td", { class: i.healthy ? "ok" : "bad" }, health + (i.connected ? "" : " (stream down)")));
      tr.append(el("td", {}, a.provides.join(", ") || "—"));
      rows.push(tr);
    }
  }
  body.replaceChildren(...rows);
}

function drawTraces(mesh) {
  const body = document.querySelector("#traces tbody");
  const rows = mesh.traces.map((t) => {
    const tr = el("tr", { class: "pick" + (t.trace_id === selected ? " selected" : "") });
    tr.dataset.trace = t.trace_id;
    tr.append(el("td", {}).appendChild(el("code", {}, t.trace_id)).parentNode);
    tr.append(el("td", {}, t.root), el("td", {}, String(t.spans)));
    tr.append(el("td", { class: t.errors ? "bad" : "" }, String(t.errors)), el("td", {}, ms(t.duration_nanos)));
    tr.addEventListener("click", () => openTrace(t.trace_id));
    return tr;
  });
  body.replaceChildren(...rows);
  if (selected && !opened) {
    opened = true;
    openTrace(selected);
  } else if (!selected && mesh.latest) {
    drawTree(mesh.latest);
  }
}

async function openTrace(id) {
  selected = id;
  const resp = await fetch("/dashboard/api/traces/" + encodeURIComponent(id));
  if (resp.ok) drawTree(await resp.json());
  document.querySelectorAll("#traces tr.pick").forEach((tr) => tr.classList.toggle("selected", tr.dataset.trace === id));
}

function drawTree(trace) {
  const box = document.getElementById("tree");
  const spans = trace.spans;
  const ids = new Set(spans.map((s) => s.span_id));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    if (s.parent_span_id && ids.has(s.parent_span_id)) {
      if (!children.has(s.parent_span_id)) children.set(s.parent_span_id, []);
      children.get(s.parent_span_id).push(s);
    } else {
      roots.push(s);
    }
  }
  const start = Math.min(...spans.map((s) => s.start_unix_nanos));
  const end = Math.max(...spans.map((s) => s.end_unix_nanos));
  const total = Math.max(end - start, 1);
  const out = [el("p", { class: "tree-title" }, "")];
  out[0].append(el("strong", {}, "trace "), el("code", {}, trace.trace_id), document.createTextNode(` — ${spans.length} spans, ${ms(total)}`));
  const walk = (s, depth) => {
    const a = s.attributes || {};
    const row = el("div", { class: "span-row" });
    row.dataset.span = s.span_id;
    const name = el("div", { class: "span-name" });
    name.style.paddingLeft = depth * 1.2 + "rem";
    name.append(el("span", { class: "kind" }, s.kind), document.createTextNode(`${s.agent}: ${s.name}`));
    const track = el("div", { class: "bar-track" });
    const bar = el("div", { class: "bar " + s.kind + (s.error ? " failed" : "") });
    const left = ((s.start_unix_nanos - start) / total) * 100;
    bar.style.left = left + "%";
    bar.style.width = Math.max(((s.end_unix_nanos - s.start_unix_nanos) / total) * 100, 0.2) + "%";
    const label = el("span", { class: "bar-label" }, ms(s.end_unix_nanos - s.start_unix_nanos));
    label.style.left = Math.min(left, 85) + "%";
    track.append(bar, label);
    const details = [];
    if (a["capmesh.caller"]) details.push(shortAgent(a["capmesh.caller"]) + " → " + shortAgent(a["capmesh.provider"]));
    if (a["capmesh.instance"]) details.push("instance " + a["capmesh.instance"]);
    if (a["http.response.status_code"] !== undefined) details.push("HTTP " + a["http.response.status_code"]);
    if (a["capmesh.attempts"] > 1) details.push(a["capmesh.attempts"] + " attempts");
    if (s.error) details.push("error: " + s.error);
    row.append(name, track, el("div", { class: "attrs" }, details.join(" · ")));
    out.push(row);
    for (const c of (children.get(s.span_id) || []).sort((x, y) => x.start_unix_nanos - y.start_unix_nanos)) walk(c, depth + 1);
  };
  roots.sort((x, y) => x.start_unix_nanos - y.start_unix_nanos).forEach((r) => walk(r, 0));
  box.replaceChildren(...out);
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch("/dashboard/api/mesh", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const mesh = await resp.json();
    drawGraph(mesh);
    drawAgents(mesh);
    drawTraces(mesh);
    status.textContent = `${mesh.agents.length} agents · ${mesh.capabilities.length} capabilities · ${mesh.traces.length} recent traces · ${new Date(mesh.generated_unix_ms).toLocaleTimeString()}`;
    status.className = "muted";
  } catch (e) {
    status.textContent = "cannot read the control plane: " + e.message;
    status.className = "bad";
  }
}

refresh();
setInterval(refresh, 2000);
