// The Floodway console: one page, no framework, no build step. It reads the JSON API and one
// server-sent event stream (`flow` every second, `job` and `audit` as they happen), and draws
// its charts as inline SVG.
"use strict";

const state = {
  session: null,
  samples: [],        // the flow of the last minutes, oldest first
  jobs: new Map(),    // job id -> job
  audit: [],
  watching: null,     // the job shown in the dialog
  selected: new Set(),
};
const KEPT = 300;

// ---------- helpers ----------

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const pad = (n) => String(n).padStart(2, "0");
// Local time with its zone's offset: pasted into a form (replay from, faults since), it names
// the same moment.
function time(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  const off = -d.getTimezoneOffset();
  const zone = off === 0 ? "Z"
    : `${off < 0 ? "-" : "+"}${pad(Math.floor(Math.abs(off) / 60))}:${pad(Math.abs(off) % 60)}`;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}${zone}`;
}
function num(v, digits = 0) {
  if (v === null || v === undefined) return "–";
  return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits });
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  const options = { headers: {} };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["content-type"] = "application/json";
    if (state.session) options.headers["x-floodway-csrf"] = state.session.csrf;
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { error: text }; }
  if (!response.ok) throw new ApiError(response.status, (data && data.error) || response.statusText);
  return data;
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

// A line chart of one or more series over the kept samples, as SVG.
function spark(series, { height = 56, label = "" } = {}) {
  const width = 300;
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const max = Math.max(1, ...all);
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const x = (i, len) => ((i + (n - len)) / (n - 1)) * width;
  const y = (v) => height - 2 - (v / max) * (height - 6);
  const lines = series.map((s) => {
    const pts = s.values.map((v, i) => (v === null || v === undefined) ? null :
      `${x(i, s.values.length).toFixed(1)},${y(v).toFixed(1)}`).filter(Boolean).join(" ");
    return `<polyline class="${s.cls}" points="${pts}" data-series="${esc(s.name)}"/>`;
  }).join("");
  return `<svg class="spark" viewBox="0 0 ${width} ${height}" preserveAspectRatio="none" ` +
    `role="img" aria-label="${esc(label)}"><line class="grid" x1="0" x2="${width}" y1="${height - 1}" ` +
    `y2="${height - 1}"/>${lines}</svg><div class="legend">${series.map((s) =>
      `<span><i style="background:var(--${s.cls === "a" ? "accent" : s.cls === "b" ? "bad" : "warn"})"></i>` +
      `${esc(s.name)}</span>`).join("")}<span style="margin-left:auto">max ${num(max, 1)}</span></div>`;
}

// ---------- the live stream ----------

function connect() {
  const source = new EventSource("/api/stream");
  let opened = false;
  source.onopen = () => {
    $("#live").classList.add("on");
    // Back after a break: what was missed meanwhile (a job's end, say) is read again.
    if (opened) refresh();
    opened = true;
  };
  source.onerror = () => $("#live").classList.remove("on");
  source.addEventListener("flow", (e) => {
    state.samples.push(JSON.parse(e.data));
    if (state.samples.length > KEPT) state.samples.shift();
    if (route().page === "flow") flowChanged();
  });
  source.addEventListener("job", (e) => {
    const job = JSON.parse(e.data);
    state.jobs.set(job.id, job);
    if (state.watching === job.id) showJob(job);
    if (route().page === "actions") updateActions();
  });
  source.addEventListener("audit", (e) => {
    state.audit.push(JSON.parse(e.data));
    if (route().page === "actions") updateActions();
  });
}

// The flow, the jobs and the audit log read again (after the stream was broken).
async function refresh() {
  try {
    const [{ samples }, actions] = await Promise.all([api("/api/flow"), api("/api/actions")]);
    state.samples = samples;
    for (const j of actions.jobs) state.jobs.set(j.id, j);
    state.audit = actions.audit;
  } catch (_) {
    return;
  }
  if (state.watching && state.jobs.has(state.watching)) showJob(state.jobs.get(state.watching));
  const page = route().page;
  if (page === "flow") flowChanged();
  if (page === "actions") updateActions();
}

// The flow page is drawn anew each second, but not under a pressed mouse button: a click
// whose press and release fell on either side of a redraw would be lost.
function flowChanged() {
  if (state.pressed) state.stale = true;
  else renderFlow();
}
document.addEventListener("mousedown", () => { state.pressed = true; });
document.addEventListener("mouseup", () => {
  state.pressed = false;
  if (state.stale) {
    state.stale = false;
    setTimeout(() => { if (route().page === "flow") renderFlow(); }, 0);
  }
});

// ---------- routing ----------

function route() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, q] = hash.split("?");
  const parts = path.split("/").filter(Boolean);
  return { page: parts[0] || "flow", id: parts[1] ? decodeURIComponent(parts[1]) : null,
    params: Object.fromEntries(new URLSearchParams(q || "")) };
}

function render() {
  const r = route();
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("on", a.dataset.nav === r.page));
  if (r.page === "faults" && r.id) return renderFault(r.id);
  if (r.page === "faults") return renderFaults(r.params);
  if (r.page === "actions") return renderActions();
  return renderFlow();
}

// ---------- flow ----------

function renderFlow() {
  const main = $("#main");
  const last = state.samples[state.samples.length - 1];
  if (!state.session.has_hub) {
    main.innerHTML = `<h1>Flow</h1><p class="muted">This console shows the faults that Lambda functions ` +
      `stored in ${esc(state.session.hub)}. A function's flow (invocations, iterator age, errors) is in ` +
      `CloudWatch; its faults are under <a href="#/faults">Faults</a>.</p>`;
    return;
  }
  if (!last) {
    main.innerHTML = `<h1>Flow</h1><p class="muted">Waiting for the first sample…</p>`;
    return;
  }
  const s = state.session;
  const canPause = s.can_pause && !s.read_only;
  const series = (pick) => state.samples.map(pick);
  let html = `<h1>Flow <span class="muted" style="font-size:13px;font-weight:normal">` +
    `updated ${time(last.at)}${s.metrics ? ` · rates from ${esc(s.metrics)}` : ""}</span></h1>`;
  if (last.problems.length) {
    html += `<div class="problems">${last.problems.map(esc).join("<br>")}</div>`;
  }
  if (!s.metrics) {
    html += `<p class="muted">Live rates come from the processors' metrics: serve this console ` +
      `with <code>floodway run --console</code>, or give <code>floodway console</code> the ` +
      `<code>--metrics-url</code> of a run's <code>--metrics</code>. The hub's side is below.</p>`;
  }
  html += `<div class="grid">`;
  for (const p of last.processors) {
    const paused = p.paused === true;
    const pipelines = last.pipelines.filter((x) => x.processor === p.name);
    html += `<section class="card" data-testid="processor" data-processor="${esc(p.name)}">
      <div class="top"><h2>${esc(p.name)}</h2>
      ${p.paused === null ? "" : paused ? `<span class="badge warn">paused</span>` : `<span class="badge ok">running</span>`}
      <span style="margin-left:auto"></span>
      ${canPause && p.paused !== null ? `<button data-pause="${esc(p.name)}" data-paused="${paused}">${paused ? "Resume" : "Pause"}</button>` : ""}
      </div>
      <div class="stats">
        <div class="stat"><b>${num(p.in_flight)}</b><span>in flight</span></div>
        <div class="stat"><b>${p.lag_seconds === null ? "–" : num(p.lag_seconds, 1) + " s"}</b><span>behind</span></div>
      </div>`;
    for (const pl of pipelines) {
      const mine = (x) => x.processor === p.name && x.pipeline === pl.pipeline;
      const rate = (k) => series((smp) => { const f = smp.pipelines.find(mine); return f ? f.rate[k] : null; });
      html += `<h3>${esc(pl.pipeline)}</h3>
        <div class="stats" data-testid="pipeline" data-processor="${esc(p.name)}" data-pipeline="${esc(pl.pipeline)}"
             data-taken="${pl.total.taken}" data-delivered-rate="${pl.rate.delivered}">
          <div class="stat"><b>${num(pl.rate.taken, 1)}</b><span>taken/s</span></div>
          <div class="stat"><b>${num(pl.rate.delivered, 1)}</b><span>delivered/s</span></div>
          <div class="stat"><b>${num(pl.rate.filtered, 1)}</b><span>filtered/s</span></div>
          <div class="stat"><b>${num(pl.rate.faulted, 1)}</b><span>faulted/s</span></div>
          <div class="stat"><b>${num(pl.total.taken)}</b><span>taken in all</span></div>
        </div>
        ${spark([{ name: "delivered/s", cls: "a", values: rate("delivered") },
                 { name: "faulted/s", cls: "b", values: rate("faulted") }], { label: `${pl.pipeline} rates` })}`;
    }
    if (!pipelines.length && s.metrics) html += `<p class="muted">No events yet.</p>`;
    html += `</section>`;
  }
  html += `</div>`;

  html += `<h3>Subscriptions</h3>`;
  if (!last.subscriptions.length) html += `<p class="muted">No subscriptions yet.</p>`;
  else {
    html += `<div class="grid">`;
    for (const sub of last.subscriptions) {
      const lag = series((smp) => { const x = smp.subscriptions.find((y) => y.name === sub.name); return x ? x.lag : null; });
      html += `<section class="card" data-testid="subscription" data-name="${esc(sub.name)}" data-lag="${sub.lag}">
        <div class="top"><h2>${esc(sub.name)}</h2><span class="badge ${sub.lag ? "warn" : "ok"}">lag ${num(sub.lag)}</span>
        ${sub.owner ? `<span class="muted" style="margin-left:auto;font-size:12px">owner ${esc(sub.owner)}</span>` : ""}</div>
        ${spark([{ name: "lag", cls: "c", values: lag }], { label: `${sub.name} lag` })}
        <table><tr><th>partition</th><th class="num">lag</th></tr>
        ${sub.partitions.map(([p, l]) => `<tr><td>${esc(p)}</td><td class="num">${num(l)}</td></tr>`).join("")}
        </table><p class="muted" style="font-size:12px">${esc(sub.progress)}</p></section>`;
    }
    html += `</div>`;
  }

  if (last.sinks.length || last.rate_limit_waits) {
    html += `<h3>Targets</h3><div class="grid">`;
    for (const sk of last.sinks) {
      const limit = series((smp) => { const x = smp.sinks.find((y) => y.sink === sk.sink); return x ? x.limit : null; });
      const thr = series((smp) => { const x = smp.sinks.find((y) => y.sink === sk.sink); return x ? x.throttles : null; });
      const cls = sk.breaker === "open" ? "bad" : sk.breaker === "half-open" ? "warn" : "ok";
      html += `<section class="card" data-testid="sink" data-sink="${esc(sk.sink)}">
        <div class="top"><h2>${esc(sk.sink)}</h2>${sk.breaker ? `<span class="badge ${cls}">breaker ${sk.breaker}</span>` : ""}</div>
        <div class="stats">
          <div class="stat"><b>${num(sk.limit)}</b><span>concurrency limit</span></div>
          <div class="stat"><b>${num(sk.throttles, 1)}</b><span>throttles/s</span></div>
          <div class="stat"><b>${num(sk.retries, 1)}</b><span>retries/s</span></div>
        </div>
        ${spark([{ name: "limit", cls: "a", values: limit }, { name: "throttles/s", cls: "b", values: thr }], { label: `${sk.sink} limit` })}
      </section>`;
    }
    html += `<section class="card"><div class="top"><h2>Rate limiting</h2></div><div class="stats">
      <div class="stat"><b>${num(last.rate_limit_waits, 1)}</b><span>waits/s</span></div>
      <div class="stat"><b>${last.rate_limit_wait_ms === null ? "–" : num(last.rate_limit_wait_ms, 1) + " ms"}</b><span>mean wait</span></div>
      </div>${spark([{ name: "waits/s", cls: "c", values: series((x) => x.rate_limit_waits) }])}</section></div>`;
  }
  main.innerHTML = html;
}

async function pauseOrResume(name, paused) {
  const action = paused ? "resume" : "pause";
  confirmDialog(`${paused ? "Resume" : "Pause"} ${name}?`,
    paused ? `<p><b>${esc(name)}</b> takes records from its subscription again.</p>`
      : `<p><b>${esc(name)}</b> stops taking new records: what it holds finishes and commits, ` +
        `it keeps its subscription, and its lag grows until you resume it.</p>`,
    paused ? "Resume" : "Pause", async () => {
      await api(`/api/processors/${encodeURIComponent(name)}/${action}`, { confirm: true });
      closeDialog();
    });
}

// ---------- faults ----------

function filtersForm(params) {
  const processors = state.session.processors;
  const opt = (v, cur, label = v) => `<option value="${esc(v)}"${v === cur ? " selected" : ""}>${esc(label)}</option>`;
  return `<form class="filters" id="filters">
    <label>processor<select name="processor">${opt("", params.processor || "", "any")}${processors.map((p) => opt(p, params.processor)).join("")}</select></label>
    <label>pipeline<input name="pipeline" value="${esc(params.pipeline)}" placeholder="any" size="12"></label>
    <label>error<input name="error" value="${esc(params.error)}" placeholder="any" size="14"></label>
    <label>class<select name="class">${opt("", params.class || "", "any")}${opt("poison", params.class)}${opt("transient", params.class)}</select></label>
    <label>status<select name="status">${opt("open", params.status ?? "open")}${opt("resolved", params.status)}${opt("", params.status ?? "open", "any")}</select></label>
    <label>since<input name="since" value="${esc(params.since)}" placeholder="e.g. 1h" size="8"></label>
    <label>until<input name="until" value="${esc(params.until)}" placeholder="now" size="8"></label>
    <input type="hidden" name="view" value="${esc(params.view || "groups")}">
    ${params.step ? `<input type="hidden" name="step" value="${esc(params.step)}">` : ""}
    <button class="primary" type="submit">Filter</button>
  </form>`;
}

// The filters that select one cause's faults.
function causeFilter(c) {
  return { processor: c.processor, pipeline: c.pipeline, step: c.step, error: c.name, class: c.class };
}

async function renderFaults(params) {
  const main = $("#main");
  const view = params.view || "groups";
  const filters = { ...params, status: params.status ?? "open" };
  delete filters.view;
  main.innerHTML = `<h1>Faults</h1>${filtersForm(params)}
    <div class="tabs"><button data-view="groups" class="${view === "groups" ? "on" : ""}">By cause</button>
    <button data-view="all" class="${view === "all" ? "on" : ""}">All faults</button>
    <span style="margin-left:auto"></span>
    ${view === "all" && !state.session.read_only ? `<button id="resubmit-selected" class="primary" disabled>Resubmit selected</button>` : ""}</div>
    <div id="fault-view"><p class="muted">Loading…</p></div>`;
  const box = $("#fault-view");
  try {
    if (view === "groups") {
      const { groups } = await api(`/api/faults/groups${query(filters)}`);
      box.innerHTML = groups.length ? `<table><thead><tr><th>processor</th><th>pipeline</th><th>step</th><th>error</th>
        <th>class</th><th class="num">faults</th><th class="num">open</th><th class="num">raised</th><th>first seen</th><th>last seen</th>
        <th>latest message</th><th></th></tr></thead><tbody id="group-rows">${groups.map((g, i) => `
        <tr data-testid="group" data-faults="${g.faults}" data-open="${g.open}">
          <td>${esc(g.cause.processor)}</td><td>${esc(g.cause.pipeline)}</td><td>${esc(g.cause.step)}</td>
          <td><b>${esc(g.cause.name)}</b></td><td><span class="badge ${g.cause.class === "poison" ? "bad" : "warn"}">${esc(g.cause.class)}</span></td>
          <td class="num">${num(g.faults)}</td><td class="num">${num(g.open)}</td><td class="num">${num(g.raised)}</td>
          <td>${time(g.first_seen)}</td><td>${time(g.last_seen)}</td><td class="msg" title="${esc(g.message)}">${esc(g.message)}</td>
          <td><a href="#/faults${query({ ...filters, ...causeFilter(g.cause), view: "all" })}">list</a>
          ${state.session.read_only || !g.open ? "" : `<button data-resubmit-group="${i}">Resubmit group</button>`}</td>
        </tr>`).join("")}</tbody></table>` : `<p class="muted" data-testid="no-faults">No faults match.</p>`;
      box.groups = groups;
      box.filters = filters;
    } else {
      const { faults, total } = await api(`/api/faults${query({ ...filters, limit: 500 })}`);
      state.selected.clear();
      box.innerHTML = faults.length ? `<p class="muted">${num(total)} faults${total > faults.length ? `, the newest ${faults.length} shown` : ""}</p>
        <table><thead><tr><th><input type="checkbox" id="select-all" title="select all"></th><th>last seen</th><th>processor</th><th>pipeline</th><th>step</th>
        <th>error</th><th>class</th><th>message</th><th class="num">seen</th><th>status</th></tr></thead>
        <tbody id="fault-rows">${faults.map((f) => `
        <tr class="click" data-testid="fault" data-id="${esc(f.id)}">
          <td><input type="checkbox" data-select="${esc(f.id)}" ${f.status === "open" ? "" : "disabled"}></td>
          <td>${time(f.last_seen)}</td><td>${esc(f.processor)}</td><td>${esc(f.pipeline)}</td><td>${esc(f.step)}</td>
          <td><b>${esc(f.name)}</b></td><td>${esc(f.class)}</td><td class="msg" title="${esc(f.message)}">${esc(f.message)}</td>
          <td class="num">${num(f.seen)}</td><td><span class="badge ${f.status === "open" ? "bad" : "ok"}">${f.status}</span></td>
        </tr>`).join("")}</tbody></table>` : `<p class="muted" data-testid="no-faults">No faults match.</p>`;
    }
  } catch (e) {
    box.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

async function renderFault(id) {
  const main = $("#main");
  main.innerHTML = `<p class="muted">Loading…</p>`;
  let f;
  try { f = await api(`/api/faults/${encodeURIComponent(id)}`); } catch (e) {
    main.innerHTML = `<h1>Fault</h1><p class="error">${esc(e.message)}</p>`;
    return;
  }
  const json = (v) => esc(JSON.stringify(v, null, 2));
  main.innerHTML = `<p><a href="#/faults">← faults</a></p>
    <div class="row"><h1 style="margin:0">${esc(f.name)} <span class="badge ${f.status === "open" ? "bad" : "ok"}" data-testid="fault-status">${f.status}</span></h1>
    <span style="margin-left:auto"></span>
    ${state.session.read_only || f.status !== "open" ? "" : `<button class="primary" data-resubmit-one="${esc(f.id)}">Resubmit</button>`}</div>
    <p class="error" data-testid="fault-message">${esc(f.message)}</p>
    <div class="grid"><section class="card"><dl class="kv">
      <dt>fault id</dt><dd><code>${esc(f.id)}</code></dd>
      <dt>processor</dt><dd>${esc(f.processor)}</dd><dt>pipeline</dt><dd>${esc(f.pipeline)}</dd>
      <dt>step</dt><dd>${esc(f.step)}</dd><dt>class</dt><dd>${esc(f.class)}</dd>
      <dt>attempts</dt><dd>${num(f.attempts)}</dd><dt>raised</dt><dd>${num(f.seen)} times</dd>
      <dt>first seen</dt><dd>${time(f.first_seen)}</dd><dt>last seen</dt><dd>${time(f.last_seen)}</dd>
    </dl></section>
    <section class="card"><h2>Source record</h2><dl class="kv">
      <dt>source</dt><dd>${esc(f.record.source)}</dd><dt>partition</dt><dd>${esc(f.record.partition)}</dd>
      <dt>offset</dt><dd>${esc(f.record.offset)}</dd><dt>attempt</dt><dd>${esc(f.record.attempt)}</dd></dl>
      ${f.record.redacted ? `<p class="muted">The record is left out of the fault (redacted fields); resubmission reads it back from the hub.</p>`
        : f.record.truncated ? `<p class="muted">The record is left out of the fault (it had ${esc(f.record.truncated)} bytes, trimmed to fit its store); resubmission reads it back from the hub.</p>`
        : `<pre data-testid="fault-record">${json(f.record.data)}</pre>`}</section></div>
    <h3>Event</h3><pre data-testid="fault-event">${f.event === null ? "the record could not be decoded" : json(f.event)}</pre>
    <h3>Resubmissions</h3>${f.resubmissions.length ? `<table><tr><th>when</th><th>outcome</th><th>detail</th></tr>
      ${f.resubmissions.map((r) => `<tr data-testid="resubmission"><td>${time(r.at)}</td><td><span class="badge ${r.outcome === "succeeded" ? "ok" : "bad"}">${esc(r.outcome)}</span></td><td>${esc(r.detail)}</td></tr>`).join("")}</table>`
      : `<p class="muted">Not resubmitted yet.</p>`}`;
}

// A resubmission: the dry run in the dialog, then the job's progress there.
async function planResubmission(request) {
  let plan;
  try { plan = await api("/api/resubmit", request); } catch (e) { return alertText("Cannot resubmit", e.message); }
  const skipped = plan.skipped.length ? `<h3>Not sent (${plan.skipped.length})</h3><table>${plan.skipped.slice(0, 50).map((s) =>
    `<tr><td><code>${esc(s.id.slice(0, 12))}</code></td><td>${esc(s.why)}</td></tr>`).join("")}</table>` : "";
  if (!plan.plan) return alertHtml("Nothing to resubmit", `<p>No open fault here can be resubmitted.</p>${skipped}`);
  const targets = {};
  for (const f of plan.send) targets[`${f.processor} / ${f.pipeline}`] = (targets[`${f.processor} / ${f.pipeline}`] || 0) + 1;
  confirmDialog(`Resubmit ${plan.send.length} faults?`,
    `<p data-testid="dry-run">This dry run sends <b>${plan.send.length}</b> records back to the pipelines that failed them, through ${esc(plan.to)}:</p>
     <table>${Object.entries(targets).map(([t, n]) => `<tr><td>${esc(t)}</td><td class="num">${n}</td></tr>`).join("")}</table>
     <h3>First faults</h3><table>${plan.send.slice(0, 20).map((f) =>
      `<tr><td><code>${esc(f.id.slice(0, 12))}</code></td><td>${esc(f.name)}</td><td class="msg">${esc(f.message)}</td></tr>`).join("")}</table>${skipped}`,
    `Resubmit ${plan.send.length}`, async () => {
      const { job } = await api("/api/resubmit", { confirm: plan.plan });
      watch(job);
    });
}

// ---------- actions ----------

function jobRow(j) {
  const pct = j.total ? Math.min(100, Math.round((j.done / j.total) * 100)) : (j.state === "running" ? 0 : 100);
  return `<tr data-testid="job" data-state="${j.state}"><td>${time(j.started)}</td><td>${esc(j.who)}</td><td>${esc(j.title)}</td>
    <td><span class="badge ${j.state === "done" ? "ok" : j.state === "failed" ? "bad" : "warn"}">${j.state}</span></td>
    <td style="min-width:160px"><div class="progress"><i style="width:${pct}%"></i></div>${num(j.done)}${j.total !== null ? ` / ${num(j.total)}` : ""}</td>
    <td class="num">${num(j.succeeded)}</td><td class="num">${num(j.failed)}</td><td class="num">${num(j.skipped)}</td><td>${esc(j.error)}</td></tr>`;
}

function renderActions() {
  const main = $("#main");
  const s = state.session;
  const opt = (p) => `<option>${esc(p)}</option>`;
  main.innerHTML = `<h1>Actions</h1>
    ${s.read_only ? `<p class="muted">This console is read-only.</p>` : !s.can_replay ? "" : `<section class="card"><h2>Replay a time range</h2>
    <p class="muted">Re-deliver the events published in a range to one processor, without moving its subscription (an idempotent processor applies nothing twice).</p>
    <form class="filters" id="replay"><label>processor<select name="processor">${s.processors.map(opt).join("")}</select></label>
    <label>from<input name="from" placeholder="e.g. 2h or 2026-11-30 10:00:00+01:00" size="24" required></label>
    <label>to<input name="to" placeholder="now" size="24"></label><button class="primary" type="submit">Dry run</button></form></section>`}
    <h3>Jobs</h3><div id="jobs"></div><h3>Audit log</h3><div id="audit"></div>`;
  const form = $("#replay");
  if (form && state.replayForm) for (const [k, v] of Object.entries(state.replayForm)) form.elements[k].value = v;
  updateActions();
}

// The jobs and the audit log, drawn again as they change; the form above them is left alone.
function updateActions() {
  const jobs = [...state.jobs.values()].sort((a, b) => b.started - a.started);
  const box = $("#jobs");
  if (!box) return;
  box.innerHTML = jobs.length ? `<table><tr><th>started</th><th>who</th><th>what</th><th>state</th><th>progress</th>
      <th class="num">succeeded</th><th class="num">failed</th><th class="num">skipped</th><th></th></tr>${jobs.map(jobRow).join("")}</table>`
    : `<p class="muted">No jobs yet.</p>`;
  $("#audit").innerHTML = state.audit.length ? `<table><tr><th>when</th><th>who</th><th>action</th><th>detail</th></tr>
      ${[...state.audit].reverse().map((a) => `<tr data-testid="audit"><td>${time(a.at)}</td><td>${esc(a.who)}</td><td>${esc(a.action)}</td><td class="msg" title="${esc(a.detail)}">${esc(a.detail)}</td></tr>`).join("")}</table>`
    : `<p class="muted">Nothing done from this console yet.</p>`;
}

// What is typed into the replay form outlives a redraw of the page.
document.addEventListener("input", (e) => {
  const form = e.target.form;
  if (form && form.id === "replay") state.replayForm = Object.fromEntries(new FormData(form));
});

async function planReplay(form) {
  const body = Object.fromEntries(new FormData(form));
  state.replayForm = body;
  let plan;
  try { plan = await api("/api/replay", body); } catch (e) { return alertText("Cannot replay", e.message); }
  confirmDialog(`Replay to ${plan.processor}?`,
    `<p data-testid="dry-run">Re-deliver <b>${plan.events === null ? "the" : num(plan.events)}</b> events published ${esc(plan.range)} to <b>${esc(plan.processor)}</b>.</p>`,
    "Replay", async () => {
      const { job } = await api("/api/replay", { confirm: plan.plan });
      watch(job);
    });
}

// ---------- the dialog ----------

function openDialog(title, body, buttons) {
  $("#modal-title").textContent = title;
  $("#modal-body").innerHTML = body;
  $("#modal-buttons").innerHTML = buttons;
  $("#modal").hidden = false;
}
// Closes the dialog; the page is drawn again (a job may have changed it) unless `keep`
// (a cancelled dry run leaves the page, and its selection, as they were).
function closeDialog(keep = false) {
  $("#modal").hidden = true;
  state.watching = null;
  state.confirm = null;
  if (!keep) render();
}
// A message: text (escaped), or HTML the page built itself.
function alertText(title, text) {
  alertHtml(title, `<p class="error">${esc(text)}</p>`);
}
function alertHtml(title, html) {
  state.confirm = null;
  openDialog(title, html, `<button data-close>Close</button>`);
}
function confirmDialog(title, body, verb, act) {
  state.confirm = act;
  openDialog(title, body, `<button data-close data-keep>Cancel</button><button class="primary" id="modal-confirm">${esc(verb)}</button>`);
}
function watch(jobId) {
  state.confirm = null;
  state.watching = jobId;
  showJob(state.jobs.get(jobId) || { id: jobId, title: "starting", state: "running", done: 0, total: null, succeeded: 0, failed: 0, outcomes: [] });
}
function showJob(j) {
  const pct = j.total ? Math.min(100, Math.round((j.done / j.total) * 100)) : (j.state === "running" ? 0 : 100);
  openDialog(j.title, `<div id="job-summary" data-state="${j.state}" data-done="${j.done}" data-succeeded="${j.succeeded}" data-failed="${j.failed}" data-skipped="${j.skipped || 0}">
    <div class="progress"><i style="width:${pct}%"></i></div>
    <p><span class="badge ${j.state === "done" ? "ok" : j.state === "failed" ? "bad" : "warn"}">${j.state}</span>
    ${num(j.done)}${j.total !== null ? ` of ${num(j.total)}` : ""} · <b>${num(j.succeeded)}</b> succeeded · <b>${num(j.failed)}</b> failed${j.skipped ? ` · <b>${num(j.skipped)}</b> skipped` : ""}</p>
    ${j.error ? `<p class="error">${esc(j.error)}</p>` : ""}</div>
    ${j.outcomes && j.outcomes.length ? `<table><tr><th>fault</th><th>outcome</th><th>detail</th></tr>${j.outcomes.slice(-100).reverse().map((o) =>
      `<tr data-testid="outcome" data-outcome="${esc(o.outcome)}"><td><a href="#/faults/${encodeURIComponent(o.fault)}" data-close>${esc(o.fault.slice(0, 12))}</a></td>
       <td><span class="badge ${o.outcome === "succeeded" ? "ok" : "bad"}">${esc(o.outcome)}</span></td><td>${esc(o.detail)}</td></tr>`).join("")}</table>` : ""}`,
    `<button data-close>${j.state === "running" ? "Hide" : "Close"}</button>`);
}

// ---------- events ----------

document.addEventListener("click", async (e) => {
  const t = e.target.closest("button, a, tr, input");
  if (!t) return;
  if (t.hasAttribute("data-close")) {
    if (t.tagName === "BUTTON") e.preventDefault();
    closeDialog(t.hasAttribute("data-keep"));
    return;
  }
  if (t.id === "sign-out") {
    await api("/api/logout", {});
    location.reload();
    return;
  }
  if (t.id === "modal-confirm") {
    const act = state.confirm;
    t.disabled = true;
    try { await act(); } catch (err) { alertText("It did not work", err.message); }
    return;
  }
  if (t.dataset.pause) return pauseOrResume(t.dataset.pause, t.dataset.paused === "true");
  if (t.dataset.view) {
    const r = route();
    location.hash = `#/faults${query({ ...r.params, view: t.dataset.view })}`;
    return;
  }
  if (t.dataset.resubmitGroup !== undefined) {
    // The group's open faults within the page's other filters (its time range), as counted.
    const box = $("#fault-view");
    const g = box.groups[Number(t.dataset.resubmitGroup)];
    return planResubmission({ filter: { ...box.filters, ...causeFilter(g.cause), status: "open" } });
  }
  if (t.dataset.resubmitOne) return planResubmission({ ids: [t.dataset.resubmitOne] });
  if (t.id === "resubmit-selected") return planResubmission({ ids: [...state.selected] });
  if (t.id === "select-all") {
    document.querySelectorAll("[data-select]:not(:disabled)").forEach((c) => { c.checked = t.checked; toggle(c); });
    return;
  }
  if (t.dataset.select) { toggle(t); return; }
  if (t.tagName === "TR" && t.dataset.id) location.hash = `#/faults/${encodeURIComponent(t.dataset.id)}`;
});

function toggle(c) {
  if (c.checked) state.selected.add(c.dataset.select); else state.selected.delete(c.dataset.select);
  const b = $("#resubmit-selected");
  if (b) { b.disabled = !state.selected.size; b.textContent = `Resubmit selected${state.selected.size ? ` (${state.selected.size})` : ""}`; }
}

document.addEventListener("submit", (e) => {
  e.preventDefault();
  const form = e.target;
  if (form.id === "filters") {
    const params = Object.fromEntries(new FormData(form));
    // The status is kept even when empty: "any" differs from the default, "open".
    const q = new URLSearchParams(Object.entries(params).filter(([k, v]) => v !== "" || k === "status"));
    location.hash = `#/faults?${q}`;
  } else if (form.id === "replay") {
    planReplay(form);
  } else if (form.id === "login") {
    login(form);
  }
});

document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !$("#modal").hidden) closeDialog(!!state.confirm); });

// ---------- start ----------

async function login(form) {
  try {
    await api("/api/login", { token: form.elements.token.value });
    start();
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
}

async function start() {
  try {
    state.session = await api("/api/session");
  } catch (e) {
    if (e.status === 401) {
      $("#main").innerHTML = `<section class="card login"><h1>Sign in</h1>
        <p class="muted">This console needs a token from its token file.</p>
        <form id="login"><input id="login-token" name="token" type="password" autocomplete="current-password" placeholder="token" required>
        <button class="primary" id="login-submit" type="submit">Sign in</button><p class="error" id="login-error"></p></form></section>`;
      return;
    }
    $("#main").innerHTML = `<p class="error">${esc(e.message)}</p>`;
    return;
  }
  $("#hub").textContent = state.session.hub;
  $("#who").textContent = state.session.user + (state.session.read_only ? " · read-only" : "");
  $("#sign-out").hidden = !state.session.signed_in;
  const [{ samples }, actions] = await Promise.all([api("/api/flow"), api("/api/actions")]);
  state.samples = samples;
  for (const j of actions.jobs) state.jobs.set(j.id, j);
  state.audit = actions.audit;
  connect();
  window.onhashchange = render;
  render();
}

start();
