// The refold console: a page over the host's own HTTP API, with no build
// step and nothing fetched from elsewhere. Data from the API is only ever
// set as text (never as HTML), so a payload or a plugin's error message
// cannot script the page.
"use strict";

// ------------------------------------------------------------ basics

const $ = (sel, root) => (root || document).querySelector(sel);

// el("td", {class: "x", onclick: f}, "text", child...)
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    // Through the CSSOM: the CSP refuses style attributes in markup.
    else if (k === "style") Object.assign(e.style, v);
    else if (v === true) e.setAttribute(k, "");
    else e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const short = (d) => (d ? String(d).slice(0, 12) : "—");
const json = (v) => JSON.stringify(v, null, 2);
const enc = encodeURIComponent;

function flash(text, error) {
  const d = el("div", { class: error ? "error" : "" }, text);
  $("#flash").append(d);
  setTimeout(() => d.remove(), error ? 9000 : 4000);
}

function fmtNum(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  if (Math.abs(n) >= 100) return Math.round(n).toLocaleString("en");
  return (Math.round(n * 10) / 10).toLocaleString("en");
}

function fmtSecs(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min" + (Math.round(s % 60) ? " " + Math.round(s % 60) + " s" : "");
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

// ------------------------------------------------------------ tokens

// Asked once per browser session and kept in this tab's sessionStorage.
const tokens = {
  get admin() { return sessionStorage.getItem("refold.admin") || ""; },
  get read() { return sessionStorage.getItem("refold.read") || ""; },
  set(admin, read) {
    if (admin) sessionStorage.setItem("refold.admin", admin); else sessionStorage.removeItem("refold.admin");
    if (read) sessionStorage.setItem("refold.read", read); else sessionStorage.removeItem("refold.read");
    showSignedIn();
  },
};

function showSignedIn() {
  const on = !!(tokens.admin || tokens.read);
  $("#signout").hidden = !on;
  $("#signin-open").textContent = on ? "Tokens" : "Sign in";
}

let signinWaiters = [];
function askTokens(why) {
  const d = $("#signin");
  $("#signin-why").textContent = why || "";
  $("#admin-token").value = tokens.admin;
  $("#read-token").value = tokens.read;
  if (!d.open) d.showModal();
  return new Promise((resolve) => signinWaiters.push(resolve));
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// A call of the API. `admin`: an admin route (the admin token); else a
// query route (the read token if one is set, else the admin token, which
// the host also takes for queries). A 401 asks for tokens once and tries
// again; `raw` returns the Response.
async function api(path, opts) {
  opts = opts || {};
  for (let attempt = 0; ; attempt++) {
    const headers = Object.assign({}, opts.headers || {});
    const t = opts.admin ? tokens.admin : (tokens.read || tokens.admin);
    if (t) headers["Authorization"] = "Bearer " + t;
    let body = opts.body;
    if (body !== undefined && !(body instanceof Blob) && !(body instanceof ArrayBuffer) && typeof body !== "string") {
      body = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
    const r = await fetch(path, { method: opts.method || "GET", headers, body });
    if (r.status === 401 && attempt === 0 && !opts.noPrompt) {
      const msg = await r.json().then((b) => b.message).catch(() => "");
      const ok = await askTokens((opts.admin ? "This action needs the admin token" : "This host asks for a read token") + (msg ? ": " + msg : "."));
      if (ok) continue;
    }
    if (opts.raw) return r;
    const text = await r.text();
    let v = null;
    try { v = text ? JSON.parse(text) : null; } catch (_) { v = text; }
    if (!r.ok) throw new ApiError(r.status, (v && v.message) || (r.status + " " + r.statusText));
    return v;
  }
}

// ------------------------------------------------------------ metrics

// Prometheus text: [{name, labels, value}].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

// Events committed per second, sampled while this page is open (the
// partitions' own history comes from the host: /v1/partitions).
const POLL_MS = 2000;
const KEEP = (10 * 60 * 1000) / POLL_MS;
const series = {
  committed: [],
  push(list, s) { list.push(s); if (list.length > KEEP) list.splice(0, list.length - KEEP); },
};

async function sampleMetrics() {
  const r = await fetch("/metrics");
  if (!r.ok) throw new ApiError(r.status, "metrics: " + r.status);
  const m = parseMetrics(await r.text());
  const c = m.find((s) => s.name === "refold_events_committed_total");
  if (c) series.push(series.committed, { t: Date.now(), offset: c.value });
  return m;
}

// Per-second rates between consecutive samples of `field`.
function rates(list, field) {
  const out = [];
  for (let i = 1; i < list.length; i++) {
    const a = list[i - 1], b = list[i];
    if (a[field] === undefined || b[field] === undefined) continue;
    const dt = (b.t - a.t) / 1000;
    if (dt > 0) out.push({ t: b.t, v: Math.max(0, (b[field] - a[field]) / dt) });
  }
  return out;
}

function chart(points, cls, label) {
  const W = 300, H = 56;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "chart " + (cls || ""));
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = label;
  svg.append(title);
  if (points.length > 1) {
    const t0 = points[0].t, t1 = points[points.length - 1].t;
    const max = Math.max(1, ...points.map((p) => p.v));
    const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    pl.setAttribute("points", points.map((p) => {
      const x = t1 > t0 ? ((p.t - t0) / (t1 - t0)) * W : 0;
      const y = H - 3 - (p.v / max) * (H - 6);
      return x.toFixed(1) + "," + y.toFixed(1);
    }).join(" "));
    svg.append(pl);
  }
  return svg;
}

// ------------------------------------------------------------ health

let lastHealth = null;
async function refreshHealth() {
  const b = $("#health");
  try {
    const r = await fetch("/healthz");
    const h = await r.json();
    lastHealth = h;
    b.className = "badge " + (r.ok ? "ok" : "bad");
    b.textContent = r.ok ? "healthy" : "unhealthy";
    b.title = h.reason || (r.ok ? "healthy" : "unhealthy");
  } catch (e) {
    lastHealth = null;
    b.className = "badge bad";
    b.textContent = "unreachable";
    b.title = String(e);
  }
}

function healthReason(h) {
  if (!h) return "the host does not answer";
  const why = [];
  if (h.reason) why.push(h.reason);
  for (const [k, p] of Object.entries(h.partitions || {})) if (p.stalled) why.push(`${k} stalled: lag ${p.lag}, idle ${fmtSecs(p.idle_seconds)}`);
  if (h.status !== "ok" && h.loop_idle_seconds > 10) why.push(`consume loop idle ${fmtSecs(h.loop_idle_seconds)}`);
  return why.join("; ");
}

// ------------------------------------------------------------ views

const views = {};

views.overview = async (root) => {
  await sampleMetrics().catch(() => {});
  const h = lastHealth;
  const ok = h && h.status === "ok";
  root.append(el("div", { class: "card", id: "health-card" },
    el("h3", {}, "Health ", el("span", { class: "badge " + (ok ? "ok" : "bad"), id: "health-verdict" }, ok ? "healthy" : "unhealthy")),
    el("p", { id: "health-reason" }, ok ? "Every partition progresses and nothing is being waited out." : healthReason(h)),
    h ? el("dl", { class: "kv" },
      el("dt", {}, "uptime"), el("dd", {}, fmtSecs(h.uptime_seconds)),
      el("dt", {}, "loop idle"), el("dd", {}, fmtSecs(h.loop_idle_seconds))) : null));
  const committed = rates(series.committed, "offset");
  const now = committed.length ? committed[committed.length - 1].v : null;
  root.append(el("div", { class: "card" },
    el("h3", {}, "Events committed per second: ", el("span", { id: "committed-rate" }, fmtNum(now))),
    chart(committed, "", "events committed per second, last minutes")));
  const trend = await api("/v1/partitions");
  const grid = el("div", { class: "grid", id: "partitions" });
  for (const p of trend.partitions) {
    const key = p.source + "#" + p.partition;
    const list = p.samples.map((s) => ({ t: s.at_ms, lag: s.lag ?? undefined, offset: s.committed_offset ?? undefined }));
    const last = list[list.length - 1] || {};
    const hp = (h && h.partitions && h.partitions[key]) || {};
    const thr = rates(list, "offset");
    const lag = list.filter((s) => s.lag !== undefined).map((s) => ({ t: s.t, v: s.lag }));
    grid.append(el("div", { class: "card partition", dataset: { partition: key } },
      el("h3", {}, key, " ", hp.stalled ? el("span", { class: "badge bad" }, "stalled") : null),
      el("div", { class: "muted" }, "lag ", el("b", { class: "lag" }, fmtNum(last.lag)),
        " · committed ", el("b", { class: "throughput" }, fmtNum(thr.length ? thr[thr.length - 1].v : null)), "/s",
        " · idle ", fmtSecs(hp.idle_seconds), "  (records for Kafka, bytes for files)"),
      el("div", { class: "muted" }, "throughput"), chart(thr, "", key + " throughput"),
      el("div", { class: "muted" }, "lag"), chart(lag, "lag", key + " lag")));
  }
  root.append(el("h2", {}, `Partitions (the last ${fmtSecs(trend.window_seconds)}, in ${trend.step_seconds} s steps)`));
  root.append(trend.partitions.length ? grid : el("p", { class: "muted" }, "No partition has reported yet."));
};
views.overview.poll = true;

async function pluginList() {
  return (await api("/v1/plugins", { admin: true })).plugins;
}

views.plugins = async (root) => {
  if (!tokens.admin) {
    root.append(el("div", { class: "card" }, el("p", {}, "Plugins and every admin action need the admin token."),
      el("button", { class: "primary", type: "button", onclick: () => askTokens("The admin token of this host.").then((ok) => ok && render()) }, "Enter the admin token")));
    return;
  }
  const [plugins, limits] = await Promise.all([pluginList(), api("/v1/admin/limits", { admin: true })]);
  root.append(uploadCard(plugins.map((p) => p.entity_type), limits.plugins.max_upload_bytes));
  if (!plugins.length) root.append(el("p", { class: "muted" }, "No plugin is stored or running."));
  for (const p of plugins) root.append(await pluginCard(p));
};

// `maxBytes`: the host's upload limit, checked here first so that an
// oversized file is refused before it is sent.
function uploadCard(types, maxBytes) {
  const type = el("input", { id: "upload-type", list: "known-types", required: true, placeholder: "entity type", value: types[0] || "" });
  const file = el("input", { id: "upload-file", type: "file", accept: ".wasm,application/wasm", required: true });
  const mode = el("select", { id: "upload-mode" },
    el("option", { value: "forward" }, "activate: forward"),
    el("option", { value: "rebuild" }, "activate: rebuild from history"),
    el("option", { value: "none" }, "store only"));
  const out = el("div", { id: "upload-result" });
  const form = el("form", { id: "upload-form", class: "card", onsubmit: async (ev) => {
    ev.preventDefault();
    const f = file.files[0];
    if (!f || !type.value) return;
    if (f.size > maxBytes) {
      out.replaceChildren(el("span", { class: "error-text" }, `refused here: ${f.name} is ${fmtNum(f.size)} bytes, over this host's limit of ${fmtNum(maxBytes)} (plugins.max_upload_bytes)`));
      return;
    }
    out.textContent = "uploading " + f.name + " (" + fmtNum(f.size) + " bytes)…";
    try {
      const r = await api("/v1/plugins/" + enc(type.value) + "?mode=" + enc(mode.value),
        { method: "PUT", admin: true, body: f, headers: { "Content-Type": "application/wasm" } });
      out.textContent = `stored ${r.version.name} ${r.version.version} (${short(r.version.digest)}), sample fold: ${r.sample.entities} entities, ${r.sample.events} events` +
        (r.activation ? ", activated (" + r.activation + ")" : ", not activated") + (r.rebuild ? ", rebuild " + r.rebuild : "");
      flash("uploaded " + r.version.name + " " + r.version.version);
      file.value = "";
      await render();
    } catch (e) {
      out.replaceChildren(el("span", { class: "error-text" }, "refused: " + e.message));
    }
  } },
  el("h3", {}, "Upload a version"),
  el("datalist", { id: "known-types" }, types.map((t) => el("option", { value: t }))),
  el("div", { class: "row" }, type, file, mode, el("button", { class: "primary", type: "submit", id: "upload-submit" }, "Upload")),
  out);
  return form;
}

async function adminAction(what, f) {
  try {
    const r = await f();
    flash(what);
    await render();
    return r;
  } catch (e) {
    flash(what + " failed: " + e.message, true);
  }
}

async function pluginCard(p) {
  const a = p.active;
  const byDigest = new Map(p.versions.map((v) => [v.digest, v]));
  const label = (d) => { const v = byDigest.get(d); return v ? `${v.name} ${v.version} (${short(d)})` : short(d); };
  const t = p.entity_type;
  const activate = (digest, mode) => adminAction(`activated ${label(digest)} (${mode})`,
    () => api("/v1/plugins/" + enc(t) + "/activate", { method: "POST", admin: true, body: { digest, mode } }));
  const card = el("div", { class: "card plugin", dataset: { entityType: t } },
    el("h3", {}, t),
    el("dl", { class: "kv" },
      el("dt", {}, "active"), el("dd", { class: "active-version" }, a ? label(a.digest) : "none stored"),
      el("dt", {}, "running here"), el("dd", { class: "running-digest mono" }, p.running_digest || "none"),
      a ? [el("dt", {}, "digest"), el("dd", { class: "mono" }, a.digest),
        el("dt", {}, "generation"), el("dd", { class: "mono" }, a.generation || "base"),
        el("dt", {}, "activated"), el("dd", {}, `${a.activated_at} (${a.mode}, #${a.seq})`),
        el("dt", {}, "rollback to"), el("dd", {}, a.previous ? label(a.previous) + (a.previous_generation ? ", generation " + a.previous_generation : "") : "nothing")] : null),
    el("div", { class: "row" },
      el("button", { type: "button", class: "danger rollback", disabled: !(a && a.previous), onclick: () => {
        if (confirm(`Roll ${t} back to ${label(a.previous)}?`)) adminAction("rolled back " + t, () => api("/v1/plugins/" + enc(t) + "/rollback", { method: "POST", admin: true }));
      } }, "Roll back"),
      el("button", { type: "button", class: "rebuild", disabled: !a, onclick: () => {
        if (confirm(`Rebuild every ${t} from its history with ${label(a.digest)}?`)) activate(a.digest, "rebuild");
      } }, "Rebuild")));
  const rows = p.versions.slice().reverse().map((v) => el("tr", { dataset: { digest: v.digest } },
    el("td", {}, v.name), el("td", {}, v.version), el("td", { class: "mono", title: v.digest }, short(v.digest)),
    el("td", {}, fmtNum(v.size)), el("td", {}, v.uploaded_at),
    el("td", {}, a && a.digest === v.digest ? el("span", { class: "badge ok" }, "active") : (a && a.previous === v.digest ? el("span", { class: "badge" }, "previous") : (a && (a.rolled_back || []).includes(v.digest) ? el("span", { class: "badge warn" }, "rolled back") : ""))),
    el("td", {}, el("div", { class: "row" },
      el("button", { type: "button", class: "activate", disabled: !!(a && a.digest === v.digest), onclick: () => activate(v.digest, "forward") }, "Activate"),
      el("button", { type: "button", onclick: () => { if (confirm(`Rebuild every ${t} from its history with ${label(v.digest)}?`)) activate(v.digest, "rebuild"); } }, "Activate with rebuild")))));
  card.append(el("h3", {}, "Versions"), el("table", {},
    el("thead", {}, el("tr", {}, ["name", "version", "digest", "bytes", "uploaded", "", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows)));
  card.append(el("h3", {}, "Activation history"), await historyTable(t, label));
  return card;
}

async function historyTable(t, label) {
  let page;
  try {
    page = await api("/v1/plugins/" + enc(t) + "/activations?limit=20", { admin: true });
  } catch (e) {
    return el("p", { class: "error-text" }, e.message);
  }
  if (!page.items.length) return el("p", { class: "muted" }, "No activation is stored.");
  return el("table", { class: "history" },
    el("thead", {}, el("tr", {}, ["#", "when", "version", "how", "generation", "replaced"].map((h) => el("th", {}, h)))),
    el("tbody", {}, page.items.map((h) => el("tr", {},
      el("td", {}, h.seq), el("td", {}, h.activated_at), el("td", {}, label(h.digest)), el("td", {}, h.mode),
      el("td", { class: "mono" }, h.generation || "base"), el("td", {}, h.previous ? label(h.previous) : "—")))));
}

// Rate and ETA as the host reports them, else from two looks of this page.
const rebuildSeen = new Map();
views.rebuilds = async (root) => {
  if (!tokens.admin) {
    root.append(el("button", { class: "primary", type: "button", onclick: () => askTokens("Rebuilds need the admin token.").then((ok) => ok && render()) }, "Enter the admin token"));
    return;
  }
  const { rebuilds } = await api("/v1/rebuilds", { admin: true });
  if (!rebuilds.length) { root.append(el("p", { class: "muted" }, "No rebuild has run.")); return; }
  const rows = rebuilds.slice().sort((a, b) => String(b.started_at).localeCompare(String(a.started_at))).map((r) => {
    const pct = r.events_total ? Math.min(100, (100 * r.events_done) / r.events_total) : (r.state === "done" ? 100 : 0);
    let rate = r.rate, eta = r.eta_seconds;
    const prev = rebuildSeen.get(r.id), now = Date.now();
    if (!rate && prev && now > prev.t && r.events_done > prev.events) rate = ((r.events_done - prev.events) * 1000) / (now - prev.t);
    if (eta === null && rate > 0 && r.events_total > r.events_done) eta = (r.events_total - r.events_done) / rate;
    rebuildSeen.set(r.id, { t: now, events: r.events_done });
    return el("tr", { dataset: { rebuild: r.id } },
      el("td", { class: "mono" }, r.id), el("td", {}, r.entity_type), el("td", { class: "mono" }, short(r.digest)),
      el("td", {}, el("span", { class: "badge " + (r.state === "done" ? "ok" : r.state === "failed" ? "bad" : "warn") }, r.state)),
      el("td", {}, el("div", { class: "bar", title: pct.toFixed(1) + "%" }, el("span", { style: { width: pct.toFixed(1) + "%" } })),
        el("div", { class: "muted" }, `${fmtNum(r.events_done)} / ${fmtNum(r.events_total)} events, ${fmtNum(r.entities_done)} / ${fmtNum(r.entities_total)} entities`)),
      el("td", {}, rate ? fmtNum(rate) + " ev/s" : "—"), el("td", {}, r.state === "done" ? "—" : fmtSecs(eta)),
      el("td", {}, r.quarantined), el("td", { class: "error-text" }, r.error || ""));
  });
  root.append(el("table", {}, el("thead", {}, el("tr", {}, ["id", "type", "digest", "state", "progress", "rate", "ETA", "quarantined", "error"].map((h) => el("th", {}, h)))), el("tbody", {}, rows)));
};
views.rebuilds.poll = true;

// A listing with a "More" button over `next`.
async function paged(root, path, cursor, renderItems) {
  const body = el("div", {});
  root.append(body);
  let next = null;
  const more = el("button", { type: "button", class: "more", hidden: true, onclick: () => load(next) }, "More");
  root.append(more);
  async function load(c) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(path + (c ? sep + cursor + "=" + enc(c) : ""));
    body.append(renderItems(page.items));
    next = page.next;
    more.hidden = !next;
    return page;
  }
  return load(null);
}

function download(name, text) {
  const a = el("a", { href: URL.createObjectURL(new Blob([text], { type: "application/x-ndjson" })), download: name });
  document.body.append(a);
  a.click();
  a.remove();
}

views.quarantine = async (root) => {
  const page = await paged(root, "/v1/quarantine", "after", (items) => el("div", {}, items.map((q) => quarantineCard(q))));
  if (!page.items.length) root.prepend(el("p", { class: "muted", id: "quarantine-empty" }, "No entity is quarantined."));
};
views.quarantine.poll = true;

function quarantineCard(q) {
  const t = q.key.entity_type, id = q.key.entity_id;
  const base = "/v1/quarantine/" + enc(t) + "/" + enc(id);
  const details = el("div", { class: "details" });
  const card = el("div", { class: "card quarantined", dataset: { entity: t + "/" + id } },
    el("h3", {}, el("a", { href: "#/entity/" + enc(t) + "/" + enc(id) }, t + " / " + id), " ", el("span", { class: "badge bad" }, q.kind)),
    el("pre", { class: "error-text reason" }, q.error),
    el("dl", { class: "kv" },
      el("dt", {}, "failing event"), el("dd", { class: "mono" }, `${q.event_id} (position ${q.event_position})`),
      el("dt", {}, "plugin"), el("dd", {}, `${q.plugin.name} ${q.plugin.version} (${short(q.plugin.digest)})`),
      el("dt", {}, "recorded"), el("dd", {}, q.recorded_at)),
    el("div", { class: "row" },
      el("button", { type: "button", class: "primary retry", onclick: async () => {
        try {
          const r = await api(base + "/retry", { method: "POST", admin: true });
          if (r.quarantined) flash(`${t}/${id} failed again: ${r.error}`, true);
          else flash(`${t}/${id} retried: ${r.held_events} held events folded, position ${r.position}`);
          await render();
        } catch (e) { flash("retry failed: " + e.message, true); }
      } }, "Retry"),
      el("button", { type: "button", class: "fixture", onclick: async () => {
        try {
          const f = await api(base + "/fixture", { admin: true });
          download(`${t}-${id}-events.jsonl`, f.events.map((e) => JSON.stringify(e)).join("\n") + "\n");
          download(`${t}-${id}-expected.jsonl`, f.expected.map((e) => JSON.stringify(e)).join("\n") + "\n");
          flash("fixture saved: put both files in a directory as events.jsonl and expected.jsonl and run refold test");
        } catch (e) { flash("fixture failed: " + e.message, true); }
      } }, "Download fixture"),
      el("button", { type: "button", onclick: async () => {
        if (details.childElementCount) { details.replaceChildren(); return; }
        try {
          const f = await api(base + "/fixture", { admin: true });
          const failing = f.events.find((e) => e.id === q.event_id);
          details.append(el("h3", {}, "State before (position " + f.position + ")"), el("pre", {}, json(f.state_before)),
            el("h3", {}, "Failing event"), el("pre", { class: "failing-event" }, json(failing || null)));
        } catch (e) { details.append(el("p", { class: "error-text" }, e.message)); }
      } }, "State before and failing event")),
    details);
  return card;
}

const editing = new Set();
views["dead-letters"] = async (root) => {
  const page = await paged(root, "/v1/dead-letters", "after", (items) => el("div", {}, items.map((d) => deadLetterCard(d))));
  if (!page.items.length) root.prepend(el("p", { class: "muted" }, "No dead letter."));
};
views["dead-letters"].poll = () => editing.size === 0;

function deadLetterCard(d) {
  const editor = el("textarea", { class: "edit", hidden: true, spellcheck: "false" });
  const resubmit = async (body) => {
    try {
      const r = await api("/v1/dead-letters/" + enc(d.id) + "/resubmit", { method: "POST", admin: true, body });
      if (r.accepted) flash(`resubmitted: ${r.stored} stored, ${r.duplicates} already stored, ${r.applied} folded`);
      else flash("still refused: the record did not become an event", true);
      editing.delete(d.id);
      await render();
    } catch (e) { flash("resubmit failed: " + e.message, true); }
  };
  const sendEdited = el("button", { type: "button", class: "primary send-edited", hidden: true, onclick: () => {
    let v;
    try { v = JSON.parse(editor.value); } catch (e) { flash("not JSON: " + e.message, true); return; }
    resubmit(v);
  } }, "Resubmit edited");
  return el("div", { class: "card dead-letter", dataset: { id: d.id } },
    el("h3", {}, el("span", { class: "badge warn" }, d.code), " ", d.entity_type || "", " ", d.event_id ? el("span", { class: "mono" }, d.event_id) : ""),
    el("p", { class: "error-text reason" }, d.reason),
    el("dl", { class: "kv" },
      el("dt", {}, "id"), el("dd", { class: "mono" }, d.id),
      el("dt", {}, "from"), el("dd", { class: "mono" }, d.origin ? JSON.stringify(d.origin) : "—"),
      el("dt", {}, "recorded"), el("dd", {}, d.recorded_at)),
    el("pre", { class: "payload" }, d.payload),
    el("div", { class: "row" },
      el("button", { type: "button", class: "resubmit", onclick: () => resubmit(undefined) }, "Resubmit as is"),
      el("button", { type: "button", class: "start-edit", onclick: () => {
        editing.add(d.id);
        let text = d.payload;
        try { text = json(JSON.parse(d.payload)); } catch (_) { /* not JSON: edit the text */ }
        editor.value = text;
        editor.hidden = false;
        sendEdited.hidden = false;
      } }, "Edit")),
    editor, sendEdited);
}

views.entities = async (root, args) => {
  let types = [];
  if (tokens.admin) types = (await pluginList().catch(() => [])).map((p) => p.entity_type);
  const type = el("input", { id: "entities-type", list: "entity-types", placeholder: "entity type", value: args[0] || types[0] || "" });
  const id = el("input", { id: "entity-id", placeholder: "entity id (optional)" });
  const list = el("div", { id: "entity-list" });
  root.append(el("form", { class: "card row", onsubmit: (ev) => {
    ev.preventDefault();
    if (id.value) location.hash = "#/entity/" + enc(type.value) + "/" + enc(id.value);
    else location.hash = "#/entities/" + enc(type.value);
  } }, el("datalist", { id: "entity-types" }, types.map((t) => el("option", { value: t }))), type, id, el("button", { type: "submit", class: "primary" }, "Show")), list);
  if (!type.value) return;
  await paged(list, "/v1/entities/" + enc(type.value) + "?limit=100", "after", (items) =>
    el("ul", {}, items.map((i) => el("li", {}, el("a", { href: "#/entity/" + enc(type.value) + "/" + enc(i.entity_id) }, i.entity_id)))));
};

views.entity = async (root, args) => {
  const [t, id] = args;
  const base = "/v1/entities/" + enc(t) + "/" + enc(id);
  const v = await api(base);
  const atOut = el("pre", { id: "state-at" });
  const atLabel = el("span", { id: "at-label" });
  const slider = el("input", { type: "range", id: "at", min: v.head ? 1 : 0, max: v.head, value: v.position || v.head, disabled: !v.head });
  let timer = null;
  const showAt = async () => {
    const p = Number(slider.value);
    atLabel.textContent = "position " + p + " of " + v.head;
    try {
      const s = await api(base + "?at=" + p);
      atOut.textContent = json(s.state);
      atOut.dataset.position = String(s.position);
    } catch (e) {
      atOut.textContent = e.message;
      atOut.dataset.position = "";
    }
  };
  slider.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(showAt, 150); });
  root.append(el("div", { class: "card" },
    el("h3", {}, t + " / " + id, " ", v.quarantined ? el("a", { href: "#/quarantine", class: "badge bad" }, "quarantined") : el("span", { class: "badge ok" }, "live")),
    el("dl", { class: "kv" },
      el("dt", {}, "position"), el("dd", { id: "entity-position" }, v.position + " of " + v.head + " stored"),
      el("dt", {}, "plugin"), el("dd", {}, v.plugin ? `${v.plugin.name} ${v.plugin.version} (${short(v.plugin.digest)})` : "—"),
      el("dt", {}, "generation"), el("dd", { class: "mono" }, v.generation || "base")),
    el("h3", {}, "State now"), el("pre", { id: "state-now" }, json(v.state))));
  root.append(el("div", { class: "card" }, el("h3", {}, "State at a past position"), slider, atLabel, atOut));
  const events = el("div", { class: "card" }, el("h3", {}, "Events"));
  root.append(events);
  await paged(events, base + "/events?limit=100", "from", (items) => el("table", { class: "events" },
    el("tbody", {}, items.map((e) => el("tr", { dataset: { position: e.position } },
      el("td", {}, el("a", { href: "#", onclick: (ev) => { ev.preventDefault(); slider.value = e.position; showAt(); } }, e.position)),
      el("td", { class: "mono" }, e.id), el("td", {}, e.event_type), el("td", {}, e.time || ""),
      el("td", {}, el("pre", {}, JSON.stringify(e.data))))))));
  if (v.head) await showAt();
};

// ------------------------------------------------------------ routing

let rendering = Promise.resolve();
function route() {
  const parts = (location.hash.replace(/^#\/?/, "") || "overview").split("/").map(decodeURIComponent);
  const name = views[parts[0]] ? parts[0] : "overview";
  return { name, args: parts.slice(1) };
}

// Draw the current view into a fresh element and swap it in whole, so a
// poll never leaves half a page.
function render() {
  rendering = rendering.then(async () => {
    const { name, args } = route();
    for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.tab === name || (name === "entity" && a.dataset.tab === "entities"));
    const next = el("main", { id: "view", dataset: { view: name } });
    try {
      await views[name](next, args);
    } catch (e) {
      next.append(el("div", { class: "card" }, el("p", { class: "error-text", id: "view-error" }, e.message)));
    }
    $("#view").replaceWith(next);
  });
  return rendering;
}

function poll() {
  refreshHealth();
  const v = views[route().name];
  const again = typeof v.poll === "function" ? v.poll() : v.poll;
  if (again && !$("#signin").open) return render();
  if (route().name !== "overview") sampleMetrics().catch(() => {});
}

// Whatever the policy blocks is a defect of this page: say so rather than
// leave a part of it silently undrawn (and count it, for the browser test).
let violations = 0;
document.addEventListener("securitypolicyviolation", (e) => {
  violations++;
  document.documentElement.dataset.cspViolations = String(violations);
  flash("the page's security policy blocked " + e.violatedDirective + " (" + (e.blockedURI || "inline") + ")", true);
});

document.addEventListener("DOMContentLoaded", () => {
  showSignedIn();
  $("#signin-open").addEventListener("click", () => askTokens("").then((ok) => ok && render()));
  $("#signout").addEventListener("click", () => { tokens.set("", ""); render(); });
  $("#signin").addEventListener("close", () => {
    const ok = $("#signin").returnValue === "ok";
    if (ok) tokens.set($("#admin-token").value.trim(), $("#read-token").value.trim());
    const w = signinWaiters;
    signinWaiters = [];
    for (const r of w) r(ok);
  });
  window.addEventListener("hashchange", render);
  refreshHealth().then(render);
  setInterval(poll, POLL_MS);
});
