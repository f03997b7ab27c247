// The status page of failover-proxy. Plain JavaScript, no dependencies.
// Reads GET /admin/status (every 2 s), GET /admin/events/stream (server-sent events, read
// with fetch so the admin key can go in a header: EventSource cannot send one) and
// GET /admin/requests/{id}; posts /admin/instances/{id}/drain and /enable.
// Everything from the server is put into the page as text (textContent), never as HTML.
"use strict";

const KEY = "failover-proxy-admin-key";
const POLL_MS = 2000;
const TIMELINE_MAX = 200;
let lastEventId = null;
let streamAbort = null;
let pollTimer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);
const fmtTime = (ts) => new Date(ts * 1000).toLocaleTimeString([], {hour12: false});
const ms = (v) => (typeof v === "number" ? `${v < 10 ? v.toFixed(1) : Math.round(v)} ms` : "-");

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? {Authorization: `Bearer ${key}`} : {};
}

class NeedsKey extends Error {}

async function api(path, options) {
  const resp = await fetch(path, {...options, headers: {...authHeaders(), ...(options || {}).headers}});
  if (resp.status === 401 || resp.status === 403) throw new NeedsKey(await errorText(resp));
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || `HTTP ${resp.status}`;
  } catch (e) {
    return `HTTP ${resp.status}`;
  }
}

// ------------------------------------------------------------------ login

function showLogin(message) {
  stop();
  $("main").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = sessionStorage.getItem(KEY) ? message || "" : "";
  $("login-key").focus();
}

function start() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = !sessionStorage.getItem(KEY);
  poll();
  streamEvents();
}

function stop() {
  clearTimeout(pollTimer);
  if (streamAbort) streamAbort.abort();
  streamAbort = null;
}

// ------------------------------------------------------------------ status (polled)

async function poll() {
  clearTimeout(pollTimer);
  try {
    renderStatus(await api("/admin/status"));
  } catch (e) {
    if (e instanceof NeedsKey) return showLogin(e.message);
    $("uptime").textContent = `status unavailable: ${e.message}`;
  }
  clearTimeout(pollTimer);  // (an early refresh may have overlapped this one: one chain)
  pollTimer = setTimeout(poll, POLL_MS);
}

function age(s) {
  s = Math.floor(s);
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function counts(obj) {
  const entries = Object.entries(obj || {}).sort((a, b) => b[1] - a[1]);
  return entries.length ? entries.map(([k, v]) => `${k} ${v}`).join(", ") : "-";
}

function renderStatus(doc) {
  $("version").textContent = `v${doc.version}`;
  $("uptime").textContent = `up ${age(doc.uptime_s)}` + (!doc.audit ? " · audit off"
    : doc.audit_available === false ? " · audit database away" : "");
  const hour = doc.last_hour;
  $("window").textContent = hour.window_s >= 3540 ? "Last hour" : `Since start (${age(hour.window_s)})`;
  $("c-requests").textContent = hour.requests;
  $("c-inflight").textContent = doc.inflight;
  $("c-reroutes").textContent = Object.values(hour.reroutes).reduce((a, b) => a + b, 0);
  $("c-blocked").textContent = hour.blocked;
  $("c-resumed").textContent = hour.resumed;
  $("c-outcomes").textContent = counts(hour.outcomes);
  $("c-reasons").textContent = counts(hour.reroutes);
  const tokens = hour.tokens;
  $("c-tokens").textContent = tokens.prompt + tokens.completion;
  $("c-cost").textContent = hour.cost;
  // answers that came without usage: estimated, shown apart (never added to the above)
  const guessed = hour.tokens_estimated || { prompt: 0, completion: 0 };
  $("c-token-kinds").textContent =
    `${tokens.prompt} prompt (${tokens.cached} cached), ${tokens.completion} completion` +
    (guessed.prompt + guessed.completion
      ? `; estimated (no usage): ${guessed.prompt} prompt, ${guessed.completion} completion`
      : "");
  const body = $("instances").tBodies[0];
  body.replaceChildren(...doc.instances.map(instanceRow));
}

function instanceRow(row) {
  const latency = typeof row.latency_ewma_ms === "number" ? ms(row.latency_ewma_ms)
    : typeof row.last_probe_ms === "number" ? `${ms(row.last_probe_ms)} (probe)` : "-";
  const drained = row.state === "DRAINED";
  const action = drained
    ? el("button", {type: "button", class: "enable", onclick: () => act(row.id, "enable")}, "Enable")
    : el("button", {type: "button", class: "drain", onclick: () => act(row.id, "drain")}, "Drain");
  return el("tr", {"data-id": row.id, "data-state": row.state},
    el("td", {class: "id"}, row.id, el("div", {class: "muted small"}, row.base_url)),
    el("td", {}, el("span", {class: `badge state-${row.state}`}, row.state)),
    el("td", {}, el("span", {class: `badge circuit-${row.circuit}`}, row.circuit)),
    el("td", {class: "num"}, row.inflight),
    el("td", {class: "num"}, latency),
    el("td", {}, row.fingerprint || "-"),
    el("td", {class: "reason"}, row.reason || ""),
    el("td", {}, action));
}

async function act(id, what) {
  try {
    await api(`/admin/instances/${encodeURIComponent(id)}/${what}`, {method: "POST"});
  } catch (e) {
    if (e instanceof NeedsKey) return showLogin(e.message);
    alert(`${what} ${id}: ${e.message}`);
  }
  poll();
}

// ------------------------------------------------------------------ live timeline

// One server-sent event block (WHATWG HTML, "Server-sent events"): `field: value` lines;
// lines starting with ':' are comments (the server's heartbeat).
function parseBlock(block) {
  const message = {event: "message", data: [], id: null};
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") message.data.push(value);
    else if (field === "event") message.event = value;
    else if (field === "id") message.id = value;
  }
  return message;
}

function setLive(on, text) {
  const live = $("live");
  live.className = on ? "live on" : "live off";
  live.textContent = text || (on ? "live" : "offline");
}

async function streamEvents() {
  const abort = new AbortController();
  streamAbort = abort;
  while (!abort.signal.aborted) {
    try {
      const headers = authHeaders();
      if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
      const resp = await fetch("/admin/events/stream", {headers, signal: abort.signal});
      if (resp.status === 401 || resp.status === 403) {
        const message = await errorText(resp);
        if (!abort.signal.aborted) showLogin(message);  // (else the status poll already did)
        return;
      }
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      setLive(true);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onMessage(parseBlock(buffer.slice(0, end)));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
    }
    setLive(false, "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function onMessage(message) {
  if (message.id !== null) lastEventId = message.id;
  if (!message.data.length) return;
  const data = JSON.parse(message.data.join("\n"));
  if (message.event === "shutdown") return setLive(false, "proxy stopped");
  if (message.event === "missed") {
    return addEntry(el("li", {class: "missed"}, `${data.missed} events missed (this page fell behind)`));
  }
  addEntry(timelineEntry(data));
  pollSoon();  // the tallies and instance table follow the event, not the next poll
}

let soon = null;
function pollSoon() {
  if (soon !== null) return;  // at most one early refresh pending, however many events
  soon = setTimeout(() => { soon = null; poll(); }, 250);
}

function addEntry(node) {
  const list = $("timeline");
  list.prepend(node);
  while (list.children.length > TIMELINE_MAX) list.lastChild.remove();
  $("timeline-empty").hidden = true;
}

function timelineEntry(e) {
  const d = e.detail || {};
  let what;
  if (e.type === "INSTANCE_STATE_CHANGED") {
    what = [el("b", {}, e.instance), ` ${d.old} → ${d.new}`, d.reason ? `: ${d.reason}` : ""];
  } else if (e.type === "ROUTE_BLOCKED") {
    what = [d.message || "no instance could serve"];
  } else if (e.type === "STREAM_RESUMED") {
    what = [el("b", {}, e.from_instance), " → ", el("b", {}, e.to_instance),
            ` (${d.mode}, ${d.chars_carried} chars carried)`];
  } else {
    what = [el("b", {}, e.from_instance || "-"), " → ", el("b", {}, e.to_instance || "-"),
            d.detail ? `: ${d.detail}` : ""];
  }
  const request = e.request_id
    ? el("a", {href: `#request=${encodeURIComponent(e.request_id)}`, class: "request-link",
               onclick: (ev) => { ev.preventDefault(); showRequest(e.request_id); }}, e.request_id)
    : null;
  return el("li", {"data-type": e.type, "data-reason": e.reason_code || "", "data-request": e.request_id || ""},
    el("time", {}, fmtTime(e.ts)),
    el("span", {class: `badge type-${e.type}`}, e.type),
    e.reason_code && e.reason_code !== e.type && e.type !== "INSTANCE_STATE_CHANGED"
      ? el("span", {class: "reason-code"}, e.reason_code) : null,
    el("span", {class: "what"}, what),
    request);
}

// ------------------------------------------------------------------ request view

async function showRequest(id) {
  $("request-id").value = id;
  const view = $("request-view");
  view.replaceChildren(el("p", {class: "muted"}, "loading..."));
  try {
    const doc = await api(`/admin/requests/${encodeURIComponent(id)}`);
    view.replaceChildren(...doc.requests.map(requestStory));
    history.replaceState(null, "", `#request=${encodeURIComponent(id)}`);
  } catch (e) {
    if (e instanceof NeedsKey) return showLogin(e.message);
    view.replaceChildren(el("p", {class: "error"}, e.message));
  }
}

function requestStory(r) {
  const plan = r.plan || {};
  const rows = [];
  const order = [plan.selected, ...(plan.fallback || [])].filter(Boolean);
  order.forEach((id, n) => rows.push(el("tr", {"data-candidate": id},
    el("td", {class: "num"}, n + 1), el("td", {}, id),
    el("td", {class: "num"}, plan.scores && id in plan.scores ? plan.scores[id] : "-"),
    el("td", {class: "reason"}, ((plan.reasons || {})[id] || []).join(", ")))));
  const rejected = Object.entries(plan.rejected || {}).map(([id, why]) =>
    el("tr", {"data-rejected": id}, el("td", {}, "✗"), el("td", {}, id), el("td", {}, "-"),
       el("td", {class: "reason"}, why)));
  const attempts = (r.tried || []).map((a, n) => el("tr", {"data-attempt": n + 1, "data-code": a.code || "ok"},
    el("td", {class: "num"}, n + 1), el("td", {}, a.instance),
    el("td", {}, el("span", {class: a.code ? "badge bad" : "badge good"}, a.code || "answered")),
    el("td", {class: "num"}, ms(a.elapsed_ms)), el("td", {class: "reason"}, a.detail)));
  const answered = r.final_instance ? el("b", {}, r.final_instance) : el("span", {class: "error"}, "nobody");
  const usage = r.usage;
  return el("article", {class: "story", "data-plan": r.plan_id},
    el("p", {}, "model ", el("b", {}, r.model || plan.model || "-"), " · ",
      r.outcome ? `${r.outcome} (HTTP ${r.status})` : "still running", " · answered by ", answered,
      r.duration_ms !== undefined && r.duration_ms !== null ? ` · ${ms(r.duration_ms)} total` : "",
      typeof r.ttfb_ms === "number" ? `, first byte ${ms(r.ttfb_ms)}` : "",
      usage ? ` · ${usage.prompt_tokens} + ${usage.completion_tokens} tokens` +
        (usage.tokens_estimated ? " (estimated)" : "") +
        (usage.cached_tokens ? ` (${usage.cached_tokens} cached)` : "") +
        (usage.cost ? `, cost ${usage.cost}` : "") : ""),
    el("h3", {}, "Plan ", el("span", {class: "muted small"}, plan.strategy || "")),
    el("table", {class: "plan"},
      el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "candidate"), el("th", {}, "score"),
        el("th", {}, "reasons / rejected because"))),
      el("tbody", {}, rows, rejected)),
    el("h3", {}, `Attempts (${(r.tried || []).length})`),
    el("table", {class: "attempts"},
      el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "instance"), el("th", {}, "result"),
        el("th", {}, "time"), el("th", {}, "detail"))),
      el("tbody", {}, attempts)),
    el("h3", {}, "Events"),
    el("ol", {class: "events"}, (r.events || []).map((e) => el("li", {},
      el("time", {}, fmtTime(e.ts)), " ", el("span", {class: `badge type-${e.type}`}, e.type), " ",
      e.reason_code || "", e.from_instance || e.to_instance ? ` ${e.from_instance || "-"} → ${e.to_instance || "-"}` : ""))));
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("login-key").value);
    $("login-key").value = "";
    start();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin();
  });
  $("request-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const id = $("request-id").value.trim();
    if (id) showRequest(id);
  });
  start();
  const match = location.hash.match(/^#request=(.+)$/);
  if (match) showRequest(decodeURIComponent(match[1]));
});
