// kproxy dashboard: polls the status JSON (same origin) and redraws. Everything shown is
// set as text, never as HTML: names come from configs and clusters.
"use strict";

const POLL_MS = 1500;
const STATE_CLASS = {
  // nodes
  ready: "ok", "serving-terminating": "warn", "slow-starting": "warn", ejected: "bad", unhealthy: "bad",
  // services
  "no nodes": "bad", "unknown service": "bad", "registry disabled": "warn",
  // registries
  syncing: "warn", degraded: "bad", error: "bad", stopped: "warn", "not started": "warn", disabled: "",
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function badge(state) {
  const cls = state === "ok" ? "ok" : (STATE_CLASS[state] ?? "");
  return el("span", {class: "badge " + cls, "data-state": state}, state);
}

function rate(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

function percent(value) {
  if (value === null || value === undefined) return "–";
  return (value * 100).toFixed(value >= 0.1 ? 0 : 1) + " %";
}

function latency(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return (seconds * 1000).toFixed(seconds < 0.01 ? 1 : 0) + " ms";
  return seconds.toFixed(2) + " s";
}

function ago(timestamp, now) {
  if (!timestamp) return "never";
  const s = Math.max(0, now - timestamp);
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function duration(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24;
  const m = Math.floor(seconds / 60) % 60, s = Math.floor(seconds % 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function setValue(id, text, level) {
  const node = document.getElementById(id);
  node.textContent = text;
  node.parentElement.classList.toggle("bad", level === "bad");
  node.parentElement.classList.toggle("warn", level === "warn");
}

function renderSummary(doc) {
  const s = doc.summary;
  setValue("sum-routes", s.routes);
  setValue("sum-services", s.services);
  setValue("sum-nodes", `${s.nodes_ready} / ${s.nodes_total}`,
           s.nodes_ready < s.nodes_total ? "warn" : null);
  setValue("sum-registries", `${s.registries_ok} / ${s.registries_total}`,
           s.registries_ok < s.registries_total ? "bad" : null);
  setValue("sum-rps", rate(s.requests_per_second));
  setValue("sum-errors", percent(s.error_ratio), s.error_ratio > 0 ? "bad" : null);
}

function renderRoutes(doc) {
  const body = document.querySelector("#routes tbody");
  body.replaceChildren(...doc.routes.map(r => el("tr", {"data-route": r.api},
    el("td", {class: "mono"}, r.host ?? "*"),
    el("td", {class: "mono"}, r.path),
    el("td", {}, r.match),
    el("td", {}, r.methods ? r.methods.join(" ") : "any"),
    el("td", {}, el("a", {href: "#service-" + r.service}, r.service)))));
  if (!doc.routes.length) body.append(el("tr", {}, el("td", {colSpan: 5, class: "muted"}, "no routes")));
}

function upstreamText(u) {
  if (u.type === "static") return "static nodes";
  return `${u.registry}: ${u.namespace}/${u.service} port ${u.port}`;
}

function renderServices(doc) {
  const box = document.getElementById("services");
  box.replaceChildren(...doc.services.map(s => {
    const t = s.traffic;
    const nodes = s.nodes.length
      ? s.nodes.map(n => el("li", {"data-node": n.address, "data-state": n.state},
          el("span", {class: "address mono"}, n.address),
          el("span", {class: "meta"}, [n.zone ? "zone " + n.zone : null, "weight " + n.weight].filter(Boolean).join(" · ")),
          badge(n.state)))
      : [el("li", {class: "none"}, "no nodes")];
    return el("article", {class: "service", id: "service-" + s.name, "data-service": s.name},
      el("h3", {}, s.name, s.state === "ok" ? null : badge(s.state)),
      el("div", {class: "upstream mono"}, `${s.scheme}:// · ${upstreamText(s.upstream)}`),
      el("div", {class: "traffic"},
        el("div", {}, "req/s", el("b", {class: "rps"}, rate(t.requests_per_second))),
        el("div", {}, "errors", el("b", {class: "errors"}, percent(t.error_ratio))),
        el("div", {}, "p50", el("b", {}, latency(t.p50_seconds))),
        el("div", {}, "p99", el("b", {}, latency(t.p99_seconds)))),
      el("div", {class: "muted total"}, "requests: ", el("span", {class: "requests"}, t.requests)),
      el("ul", {class: "nodes"}, ...nodes));
  }));
  if (!doc.services.length) box.append(el("p", {class: "muted"}, "no services"));
}

function renderRegistries(doc) {
  const body = document.querySelector("#registries tbody");
  body.replaceChildren(...doc.registries.map(r => el("tr", {"data-registry": r.name},
    el("td", {}, r.name),
    el("td", {class: "mono"}, r.api_server),
    el("td", {}, badge(r.state)),
    el("td", {class: "num"}, ago(r.last_sync, doc.time)),
    el("td", {}, Object.entries(r.objects).map(([k, v]) => `${v} ${k}`).join(", ") || "–"),
    el("td", {class: "error"}, r.last_error ?? ""))));
  if (!doc.registries.length) body.append(el("tr", {}, el("td", {colSpan: 6, class: "muted"}, "no registries")));
}

function renderProcess(doc) {
  const p = doc.process;
  document.getElementById("version").textContent = "v" + p.version;
  document.getElementById("config").textContent = p.config_file;
  const reload = p.last_reload ? `${p.last_reload.result}, ${ago(p.last_reload.time, doc.time)}` : "none since start";
  const rows = [
    ["Uptime", duration(p.uptime_seconds) + " (this worker)"],
    ["Server", p.server ?? "–"],
    ["Worker", `pid ${p.pid}, ${p.workers} configured` + (p.metrics_from_all_workers ? ", traffic from all workers" : "")],
    ["Config", p.config_file],
    ["Loaded", ago(p.config_loaded, doc.time)],
    ["Last reload", reload],
  ];
  document.getElementById("process").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function setLive(state, text) {
  const live = document.getElementById("live");
  live.dataset.state = state;
  live.textContent = text;
}

let lastOk = 0;

async function poll() {
  try {
    const response = await fetch("status", {cache: "no-store", credentials: "same-origin",
                                            headers: {Accept: "application/json"}});
    if (!response.ok) throw new Error(`status answered ${response.status}`);
    const doc = await response.json();
    renderSummary(doc);
    renderRoutes(doc);
    renderServices(doc);
    renderRegistries(doc);
    renderProcess(doc);
    lastOk = Date.now();
    setLive("live", "live · " + new Date(doc.time * 1000).toLocaleTimeString());
  } catch (error) {
    // keep the last good picture, and say it is stale (fetch failures are not console errors)
    setLive("lost", lastOk ? `no answer (${error.message}); showing ${Math.round((Date.now() - lastOk) / 1000)} s old data`
                           : `no answer (${error.message})`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
