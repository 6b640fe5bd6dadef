// shoal dashboard: plain JavaScript against the gateway's HTTP API (/openapi.json), no build step.
// Text from the API is only ever set as textContent, never parsed as HTML.
"use strict";

const API = "/api/v1";
const STATES = ["pending", "starting", "validating", "running", "degraded", "completed", "failed", "lost",
  "stopping", "stopped"];
const GOOD = new Set(["running", "completed", "succeeded", "ready"]);
const WAITING = new Set(["pending", "starting", "validating", "queued", "deploying", "paused", "awaiting_promotion",
  "rollout_paused", "stopping", "not started"]);
const BAD = new Set(["failed", "lost", "degraded", "rollout_failed", "disconnected"]);
const IN_PROGRESS = new Set(["queued", "deploying", "paused", "awaiting_promotion"]);
const PAGE = 20;

// -- small helpers ------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false)
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function tone(state) {
  return GOOD.has(state) ? "ok" : BAD.has(state) ? "bad" : WAITING.has(state) ? "wait" : "";
}

function badge(state) { return h("span", { class: `badge ${tone(state)}`, "data-state": state }, state); }

function when(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  return isNaN(d) ? ts : d.toLocaleString();
}

function toast(text, bad) {
  const box = h("div", { class: bad ? "bad" : "" }, text);
  document.getElementById("toast").append(box);
  setTimeout(() => box.remove(), 5000);
}

const session = {
  get ns() { return sessionStorage.getItem("shoal.namespace") || "default"; },
  set ns(v) { sessionStorage.setItem("shoal.namespace", v); },
  get token() { return sessionStorage.getItem("shoal.token") || ""; },
  set token(v) { if (v) sessionStorage.setItem("shoal.token", v); else sessionStorage.removeItem("shoal.token"); },
};

function headers(extra) {
  const out = Object.assign({ Accept: "application/json" }, extra || {});
  if (session.token) out.Authorization = `Bearer ${session.token}`;
  return out;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.field = body && body.error && body.error.field;
  }
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const res = await fetch(API + path, init);
  let data = null;
  try { data = await res.json(); } catch (e) { data = null; }
  if (!res.ok) {
    if (res.status === 401) document.getElementById("token").focus();
    throw new ApiError(res.status, data);
  }
  return data;
}

function nsPath(rest) { return `/namespaces/${encodeURIComponent(session.ns)}${rest}`; }

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.append(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

function failure(where, err) {
  const hint = err.status === 401 ? " (enter a token above)" : err.status === 403 ? " (this token may not see it)" : "";
  return h("p", { class: "muted error", "data-status": err.status || 0 }, `${where}: ${err.message}${hint}`);
}

// -- live events (Server-Sent Events read with fetch, so that the token can go in a header) -------------

const live = {
  count: 0,
  el() { return document.getElementById("live"); },
  on(on) {
    const el = this.el();
    el.classList.toggle("on", on);
    el.textContent = on ? `live · ${this.count} events` : "not live";
  },
  tick() { this.count += 1; this.el().dataset.events = String(this.count); this.on(true); },
};

async function follow(path, onEvent, signal) {
  let lastId = "";
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const res = await fetch(API + path, { headers: headers(lastId ? { "Last-Event-ID": lastId } : {}), signal });
      if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
      live.on(true);
      delay = 1000;
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let kind = "message", data = "", id = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) kind = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
            else if (line.startsWith("id: ")) id = line.slice(4);
          }
          if (id) lastId = id;
          if (data) { live.tick(); onEvent(kind, JSON.parse(data)); }
        }
      }
    } catch (err) {
      if (signal.aborted) break;
      if (err.status === 404 || err.status === 401 || err.status === 403) { live.on(false); return; }
    }
    live.on(false);
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

// -- views ----------------------------------------------------------------------------------------------

let current = null; // { stop() } of the view on screen

function show(view) {
  if (current) current.stop();
  current = view;
  const main = document.getElementById("view");
  main.replaceChildren(view.root);
  view.start();
}

function every(ms, fn) {
  const timer = setInterval(fn, ms);
  return () => clearInterval(timer);
}

function jobsView() {
  const body = h("tbody", { id: "jobs" });
  const more = h("button", { id: "jobs-more", disabled: true }, "More");
  const state = h("select", { id: "jobs-state" }, h("option", { value: "" }, "every state"),
    ["pending", "queued", "deploying", "running", "degraded", "rollout_paused", "rollout_failed", "completed", "failed",
      "stopped"].map((s) => h("option", { value: s }, s)));
  const note = h("div");
  let token = "";
  let pages = 1;

  function row(job) {
    return h("tr", { "data-job": job.name },
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.name)}` }, job.name)),
      h("td", {}, job.type), h("td", {}, badge(job.state.state_type)),
      h("td", { class: "version" }, `v${job.version}`), h("td", {}, job.stable_version ? `v${job.stable_version}` : "—"),
      h("td", { class: "muted" }, when(job.modified_at)));
  }

  async function load(reset) {
    try {
      if (reset) { token = ""; }
      const rows = [];
      let next = "";
      const want = reset ? 1 : pages;
      for (let i = 0; i < want; i++) {
        const page = await api("GET", nsPath(`/jobs${query({ limit: PAGE, order_by: "name", next_token: next,
          state: state.value })}`));
        rows.push(...page.items.map(row));
        next = page.next_token || "";
        if (!next) break;
      }
      body.replaceChildren(...rows);
      token = next;
      pages = want;
      more.disabled = !token;
      note.replaceChildren(rows.length ? "" : h("p", { class: "muted" }, "no jobs in this namespace"));
    } catch (err) { note.replaceChildren(failure("jobs", err)); }
  }

  async function next() {
    if (!token) return;
    try {
      const page = await api("GET", nsPath(`/jobs${query({ limit: PAGE, order_by: "name", next_token: token,
        state: state.value })}`));
      body.append(...page.items.map(row));
      token = page.next_token || "";
      pages += 1;
      more.disabled = !token;
    } catch (err) { note.replaceChildren(failure("jobs", err)); }
  }

  more.addEventListener("click", next);
  state.addEventListener("change", () => load(true));
  let cancel = () => {};
  return {
    root: h("section", { class: "card" }, h("h1", {}, "Jobs"), h("div", { class: "toolbar" }, state),
      h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Type", "State", "Version", "Stable", "Modified"]
        .map((t) => h("th", {}, t)))), body), note, h("div", { class: "toolbar" }, more)),
    start() { load(true); cancel = every(5000, () => load(false)); },
    stop() { cancel(); },
  };
}

function jobView(name) {
  const title = h("h1", {}, name);
  const facts = h("div", { class: "facts", id: "rollout-facts" });
  const waves = h("div", { id: "waves" });
  const budget = h("div", { id: "budget" });
  const message = h("p", { class: "muted", id: "rollout-message" });
  const buttons = {};
  for (const action of ["promote", "pause", "resume", "abort"]) {
    buttons[action] = h("button", { id: `action-${action}`, class: action === "abort" ? "danger" : "", disabled: true,
      onclick: () => control(action) }, action);
  }
  const rolloutNote = h("div");
  const execBody = h("tbody", { id: "executions" });
  const execNote = h("div");
  const filter = h("select", { id: "exec-state" }, h("option", { value: "" }, "every state"),
    STATES.map((s) => h("option", { value: s }, s)));
  const size = h("select", { id: "exec-limit", title: "rows per page" },
    [10, 20, 50, 100].map((n) => h("option", { value: n, selected: n === PAGE }, `${n} rows`)));
  const first = h("button", { id: "exec-first", disabled: true }, "First page");
  const nextBtn = h("button", { id: "exec-next", disabled: true }, "Next page");
  const pageInfo = h("span", { class: "muted", id: "exec-page" });
  const output = h("pre", { class: "output", id: "output" }, "…");
  const controller = new AbortController();
  let pageToken = "";   // the token of the page on screen ("" = the first)
  let nextToken = "";
  let pageNo = 1;
  let reloadTimer = null;
  let logsAfter = null;
  let stops = [];

  function waveRow(w, st) {
    const total = Math.max(w.nodes, 1);
    const parts = Object.entries(w.states).sort().map(([state, n]) =>
      h("span", { class: tone(state) || "idle", style: `width:${(100 * n) / total}%`, title: `${state}: ${n}`,
        "data-state": state, "data-count": n }));
    const summary = Object.entries(w.states).sort().map(([state, n]) => `${n} ${state}`).join(", ");
    const label = st.total_waves > 1 || w.wave ? `wave ${w.wave || 1}` : "all nodes";
    return h("div", { class: `wave ${w.started ? "started" : "pending"}`, "data-wave": w.wave },
      h("div", {}, label, h("div", { class: "muted" }, `${w.nodes} node${w.nodes === 1 ? "" : "s"}`)),
      h("div", { class: "bar" }, parts), h("div", { class: "muted" }, w.started ? summary : "not started"));
  }

  function renderRollout(st) {
    title.replaceChildren(name, badge(st.job_state), h("span", { class: "muted", id: "job-version" }, `v${st.job_version}`));
    facts.replaceChildren(
      ...[["rollout", badge(st.state)], ["strategy", st.strategy],
        ["wave", st.strategy === "immediate" ? "—" : `${st.current_wave} of ${st.total_waves}`],
        ["targets", st.target_nodes], ["started", when(st.started_at) || "—"]]
        .map(([k, v]) => h("div", {}, h("span", { class: "k" }, k), v)));
    facts.dataset.state = st.state;
    waves.replaceChildren(...(st.waves || []).map((w) => waveRow(w, st)));
    // The rollout fails once failed nodes exceed max_failed_nodes or max_failed_nodes_percent of the targets.
    const failed = (st.failed_nodes || []).length;
    const byPercent = Math.floor(((st.max_failed_nodes_percent || 0) * st.target_nodes) / 100 + 1e-9);
    const limit = Math.min(st.max_failed_nodes || 0, byPercent);
    const used = limit ? Math.min(100, (100 * failed) / limit) : (failed ? 100 : 0);
    budget.replaceChildren(h("div", { class: "budget", "data-failed": failed, "data-limit": limit },
      h("div", {}, "failure budget"),
      h("div", { class: "bar" }, h("span", { class: failed > limit ? "bad" : failed ? "wait" : "ok",
        style: `width:${Math.max(used, 1)}%` })),
      h("div", { class: "muted" }, `${failed} failed of at most ${limit} (max_failed_nodes ${st.max_failed_nodes || 0}, ` +
        `${st.max_failed_nodes_percent || 0}% of ${st.target_nodes})` + (failed ? `: ${st.failed_nodes.join(", ")}` : ""))),
      (st.failures || []).map((f) => h("div", { class: "failure muted" }, `${f.node_id}: ${f.message || f.state}` +
        (f.output ? ` — ${f.output}` : ""))));
    message.textContent = st.rollback_of ? `rolling back version ${st.rollback_of}: ${st.message}` : (st.message || "");
    buttons.promote.disabled = st.state !== "awaiting_promotion";
    buttons.pause.disabled = st.state !== "deploying";
    buttons.resume.disabled = st.state !== "paused";
    buttons.abort.disabled = !IN_PROGRESS.has(st.state);
    rolloutNote.replaceChildren();
  }

  async function loadRollout() {
    try { renderRollout(await api("GET", nsPath(`/jobs/${encodeURIComponent(name)}/rollout`))); }
    catch (err) {
      if (err.status === 404) {
        try {
          const { job } = await api("GET", nsPath(`/jobs/${encodeURIComponent(name)}`));
          title.replaceChildren(name, badge(job.state.state_type), h("span", { class: "muted" }, `v${job.version}`));
          rolloutNote.replaceChildren(h("p", { class: "muted" }, "no rollout yet"));
        } catch (err2) { rolloutNote.replaceChildren(failure("job", err2)); }
      } else rolloutNote.replaceChildren(failure("rollout", err));
    }
  }

  async function control(action) {
    try {
      renderRollout(await api("POST", nsPath(`/jobs/${encodeURIComponent(name)}/rollout/${action}`), {}));
      toast(`${action}: done`);
    } catch (err) { toast(`${action}: ${err.message}`, true); }
  }

  function execRow(e) {
    return h("tr", { "data-id": e.id, "data-state": e.status.observed_state.state_type },
      h("td", { class: "mono", title: e.id }, e.id.slice(0, 8)), h("td", {}, e.node_id), h("td", {}, `v${e.job_version}`),
      h("td", {}, e.rollout_wave || "—"), h("td", {}, e.status.desired_state.state_type),
      h("td", {}, badge(e.status.observed_state.state_type)), h("td", { class: "muted" }, when(e.status.updated_at)),
      h("td", { class: "muted" }, e.status.observed_state.message || ""));
  }

  async function loadExecutions() {
    try {
      const page = await api("GET", nsPath(`/jobs/${encodeURIComponent(name)}/executions${query({
        limit: size.value, next_token: pageToken, state: filter.value })}`));
      execBody.replaceChildren(...page.items.map(execRow));
      nextToken = page.next_token || "";
      nextBtn.disabled = !nextToken;
      first.disabled = pageNo === 1;
      pageInfo.textContent = `page ${pageNo}`;
      execNote.replaceChildren(page.items.length ? "" : h("p", { class: "muted" }, "no executions"));
    } catch (err) {
      if (err.field === "next_token") { pageToken = ""; pageNo = 1; return loadExecutions(); } // expired: start over
      execNote.replaceChildren(failure("executions", err));
    }
  }

  function onExecution(e) {
    const row = execBody.querySelector(`tr[data-id="${CSS.escape(e.id)}"]`);
    const state = e.status.observed_state.state_type;
    if (row && (!filter.value || filter.value === state)) { row.replaceWith(execRow(e)); return; }
    // A later page is a snapshot of its walk (its token reads the view as of the first page): only the first
    // page is read again for a change that is not on screen.
    if (pageNo === 1 && !reloadTimer) reloadTimer = setTimeout(() => { reloadTimer = null; loadExecutions(); }, 800);
  }

  async function loadOutput() {
    try {
      const page = await api("GET", nsPath(`/jobs/${encodeURIComponent(name)}/logs${query({ after: logsAfter })}`));
      const lines = (page.items || []).map((c) => c.text.replace(/^(?=.)/gm, `[${c.node_id}] `));
      if (logsAfter === null) output.textContent = lines.join("") || "no output yet";
      else if (lines.length) output.textContent += lines.join("");
      if (page.next !== undefined && page.next !== null) logsAfter = page.next;
      output.dataset.state = "ok";
      if (lines.length) output.scrollTop = output.scrollHeight;
    } catch (err) {
      if (err.status === 404 || err.status === 503) { output.textContent = "no output"; output.dataset.state = "none"; }
      else output.textContent = `output: ${err.message}`;
    }
  }

  nextBtn.addEventListener("click", () => { pageToken = nextToken; pageNo += 1; loadExecutions(); });
  first.addEventListener("click", () => { pageToken = ""; pageNo = 1; loadExecutions(); });
  for (const el of [filter, size]) el.addEventListener("change", () => { pageToken = ""; pageNo = 1; loadExecutions(); });

  const root = h("div", {},
    h("p", {}, h("a", { href: "#/jobs" }, "← jobs")),
    title,
    h("section", { class: "card", id: "rollout" }, h("h2", {}, "Rollout"), facts, waves, budget, message, rolloutNote,
      h("div", { class: "toolbar" }, Object.values(buttons))),
    h("section", { class: "card" }, h("h2", {}, "Executions"),
      h("div", { class: "toolbar" }, filter, size, first, nextBtn, pageInfo),
      h("table", {}, h("thead", {}, h("tr", {}, ["ID", "Node", "Version", "Wave", "Desired", "Observed", "Updated",
        "Message"].map((t) => h("th", {}, t)))), execBody), execNote),
    h("section", { class: "card" }, h("h2", {}, "Output"), output));

  return {
    root,
    start() {
      loadRollout();
      loadExecutions();
      loadOutput();
      stops.push(every(3000, () => { if (output.dataset.state === "ok") loadOutput(); }));
      follow(nsPath(`/jobs/${encodeURIComponent(name)}/events`), (kind, body) => {
        if (kind === "rollout") renderRollout(body);
        else if (kind === "execution") onExecution(body);
      }, controller.signal);
    },
    stop() {
      controller.abort();
      stops.forEach((f) => f());
      if (reloadTimer) clearTimeout(reloadTimer);
      live.on(false);
    },
  };
}

function nodesView() {
  const body = h("tbody", { id: "nodes" });
  const selector = h("input", { type: "text", id: "nodes-selector", size: 36, placeholder: "selector, e.g. region in (us-east)" });
  const more = h("button", { id: "nodes-more", disabled: true }, "More");
  const note = h("div");
  let token = "";

  function row(n) {
    return h("tr", { "data-node": n.id }, h("td", {}, n.id), h("td", {}, badge(n.state.state_type)), h("td", {}, Object.entries(n.labels || {}).sort().map(([k, v]) => h("span", { class: "chip" },
      `${k}=${v}`))), h("td", { class: "muted" }, n.hostname || (n.simulated ? "simulated" : "")),
    h("td", { class: "muted" }, when(n.updated_at)));
  }

  async function load(append) {
    try {
      const page = await api("GET", `/nodes${query({ limit: 100, selector: selector.value.trim(),
        next_token: append ? token : "" })}`);
      const rows = page.items.map(row);
      if (append) body.append(...rows); else body.replaceChildren(...rows);
      token = page.next_token || "";
      more.disabled = !token;
      note.replaceChildren(body.children.length ? "" : h("p", { class: "muted" }, "no nodes"));
    } catch (err) { note.replaceChildren(failure("nodes", err)); }
  }

  more.addEventListener("click", () => load(true));
  selector.addEventListener("change", () => load(false));
  let cancel = () => {};
  return {
    root: h("section", { class: "card" }, h("h1", {}, "Nodes"), h("div", { class: "toolbar" }, selector),
      h("table", {}, h("thead", {}, h("tr", {}, ["Node", "Liveness", "Labels", "Host", "Updated"].map((t) => h("th", {}, t)))),
        body), note, h("div", { class: "toolbar" }, more)),
    start() { load(false); cancel = every(5000, () => { if (!token) load(false); }); },
    stop() { cancel(); },
  };
}

// -- routing ----------------------------------------------------------------------------------------------

function route() {
  const path = location.hash.replace(/^#/, "") || "/jobs";
  const parts = path.split("/").filter(Boolean);
  document.getElementById("nav-jobs").classList.toggle("active", parts[0] !== "nodes");
  document.getElementById("nav-nodes").classList.toggle("active", parts[0] === "nodes");
  if (parts[0] === "nodes") show(nodesView());
  else if (parts[0] === "jobs" && parts[1]) show(jobView(decodeURIComponent(parts[1])));
  else show(jobsView());
}

window.addEventListener("DOMContentLoaded", () => {
  const ns = document.getElementById("namespace");
  const token = document.getElementById("token");
  ns.value = session.ns;
  token.value = session.token;
  ns.addEventListener("change", () => { session.ns = ns.value.trim() || "default"; location.hash = "#/jobs"; route(); });
  token.addEventListener("change", () => { session.token = token.value.trim(); route(); });
  window.addEventListener("hashchange", route);
  window.shoalLoadedAt = Date.now(); // a page reload would reset it: the browser test checks it does not
  route();
});
