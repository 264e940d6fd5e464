"""The status page: one self-contained HTML document (no external assets) that polls
``/api/status`` every second and computes live rates from successive polls.

Every value from the bridge is inserted as text (``textContent``), never as markup: topic
names and refusal reasons come from the network."""

from __future__ import annotations

STATUS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>flowbridge status</title>
<link rel="icon" href="data:,">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 1.5em;
         color: #1d2329; background: #fafbfc; }
  h1 { font-size: 1.4em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { border-bottom: 1px solid #e3e6ea; padding: .3em .45em;
           text-align: left; vertical-align: top; }
  th { background: #f0f2f5; font-weight: 600; }
  .nowrap { white-space: nowrap; }
  td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  code { font: 13px ui-monospace, monospace; }
  .badge { display: inline-block; padding: .05em .55em; border-radius: .8em;
           font-weight: 600; font-size: .9em; }
  .ok { background: #d5f5dd; color: #11632a; }
  .bad { background: #fddcdc; color: #8c1515; }
  .warn { background: #fff1c7; color: #7a5200; }
  .muted { color: #68717a; }
  .empty { color: #68717a; font-style: italic; }
  #meta { margin-bottom: .6em; }
</style>
</head>
<body>
<h1>flowbridge <span class="muted">bridge <span id="bridge-id"></span></span>
<span id="ready" class="badge warn">loading</span></h1>
<div id="meta" class="muted">updated <span id="updated">never</span> <span id="error"></span></div>
<noscript><p>This page needs JavaScript to update; the same data is at
<a href="api/status">api/status</a> (JSON) and <a href="metrics">metrics</a>.</p></noscript>

<h2>Brokers</h2>
<table id="brokers">
<thead><tr><th>broker</th><th>protocol</th><th>URL</th><th>state</th><th>subscribed</th>
<th class="n">reconnects</th><th>detail</th></tr></thead>
<tbody></tbody>
</table>

<h2>Routes</h2>
<table id="routes">
<thead><tr><th>route</th><th>source</th><th>targets</th><th>delivery</th>
<th class="n">in msg/s</th><th class="n">out msg/s</th><th class="n">received</th>
<th class="n">forwarded</th><th class="n">dead-<br>lettered</th><th class="n">dropped</th>
<th class="n">in<br>flight</th><th class="n">echoes<br>stopped</th></tr></thead>
<tbody></tbody>
</table>

<h2>Recent dead letters</h2>
<table id="dead">
<thead><tr><th>time</th><th>route</th><th>topic</th><th>target</th><th>reason</th></tr></thead>
<tbody></tbody>
</table>

<script>
"use strict";
let previous = null;  // last /api/status document, for rates between polls

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function num(n) { return Number(n).toLocaleString("en-US"); }
function rate(r) { return r < 10 ? r.toFixed(1) : Math.round(r).toLocaleString("en-US"); }
function badge(text, good) { return el("span", text, "badge " + (good ? "ok" : "bad")); }
function cell(row, content, cls) {
  const td = el("td", null, cls);
  if (content instanceof Node) td.appendChild(content); else td.textContent = String(content);
  row.appendChild(td);
  return td;
}
function fill(table, rows, columns, emptyText) {
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = cell(tr, emptyText, "empty");
    td.colSpan = columns;
    body.appendChild(tr);
  }
  for (const r of rows) body.appendChild(r);
}
function reasons(counts) {
  return Object.entries(counts).map(([k, v]) => k + ": " + num(v)).join("\\n");
}

function render(doc) {
  document.getElementById("bridge-id").textContent = doc.bridge.id;
  const ready = document.getElementById("ready");
  ready.textContent = doc.bridge.stopping ? "stopping" : (doc.ready ? "ready" : "not ready");
  ready.className = "badge " + (doc.ready ? "ok" : "bad");

  fill(document.getElementById("brokers"), doc.brokers.map(b => {
    const tr = el("tr");
    tr.dataset.broker = b.name;
    cell(tr, b.name);
    cell(tr, b.protocol);
    cell(tr, el("code", b.url));
    cell(tr, badge(b.state, b.state === "connected")).className = "state";
    cell(tr, b.subscribed ? "yes" : "no");
    cell(tr, num(b.reconnects), "n");
    cell(tr, b.detail === b.url ? "" : b.detail, "muted");
    return tr;
  }), 7, "no brokers in use");

  const dt = previous ? doc.time - previous.time : 0;
  const before = {};
  if (previous) for (const r of previous.routes) before[r.name] = r;
  fill(document.getElementById("routes"), doc.routes.map(r => {
    let rin = r.rate.in, rout = r.rate.out;
    const p = before[r.name];
    // Own rates from successive polls; the server's (over its last seconds) when polls came
    // too close together to say anything, or the route was restarted in between.
    if (p && dt >= 0.5 && r.received >= p.received && r.forwarded >= p.forwarded) {
      rin = (r.received - p.received) / dt;
      rout = (r.forwarded - p.forwarded) / dt;
    }
    const tr = el("tr");
    tr.dataset.route = r.name;
    cell(tr, el("b", r.name));
    cell(tr, el("code", r.source.broker + " " + r.source.filter));
    const targets = r.targets.map(t => t.broker + (t.topic ? " " + t.topic : ""));
    cell(tr, el("code", "\\u2192 " + targets.join(", ")));
    cell(tr, r.delivery, "nowrap");
    cell(tr, rate(rin), "n in-rate");
    cell(tr, rate(rout), "n out-rate");
    cell(tr, num(r.received), "n received");
    cell(tr, num(r.forwarded), "n forwarded");
    cell(tr, num(r.dead_lettered_total), "n").title = reasons(r.dead_lettered);
    cell(tr, num(r.dropped_total), "n").title = reasons(r.dropped);
    cell(tr, num(r.in_flight), "n");
    cell(tr, num(r.echo_suppressed), "n");
    return tr;
  }), 12, "no routes");

  fill(document.getElementById("dead"), doc.dead_letters.map(d => {
    const tr = el("tr");
    cell(tr, new Date(d.time * 1000).toLocaleTimeString("en-GB"));
    cell(tr, d.route);
    cell(tr, el("code", d.topic));
    cell(tr, d.target);
    cell(tr, d.reason);
    return tr;
  }), 5, "none");

  const updated = new Date(doc.time * 1000).toLocaleTimeString("en-GB");
  document.getElementById("updated").textContent = updated;
  document.getElementById("error").textContent = "";
  previous = doc;
}

async function poll() {
  try {
    const res = await fetch("api/status", {cache: "no-store"});
    if (!res.ok) throw new Error("HTTP " + res.status);
    render(await res.json());
  } catch (e) {
    const err = document.getElementById("error");
    err.textContent = "\\u2014 cannot reach the bridge (" + e.message + "); retrying";
    err.className = "badge bad";
  } finally {
    setTimeout(poll, 1000);
  }
}
poll();
</script>
</body>
</html>
"""
