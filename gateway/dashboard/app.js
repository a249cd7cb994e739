// tiergate admin dashboard: a client of the admin API. No framework, no build; every value is set with
// textContent (never parsed as HTML), so nothing a request or a policy carries can run here.
"use strict";

const POLL_MS = 2500;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const SVG = "http://www.w3.org/2000/svg";
let csrf = null; // the session's CSRF token, kept in memory only (the session itself is an HttpOnly cookie)
let timer = null;
let policyText = "";

const $ = (id) => document.getElementById(id);

async function api(method, path, body, type) {
  const headers = {};
  if (csrf && method !== "GET") headers["X-Tiergate-CSRF"] = csrf;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = type || "application/json";
    payload = type ? body : JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  const data = await response.json().catch(() => ({}));
  if (response.status === 401 && path !== "/admin/login") showLogin();
  return { ok: response.ok, status: response.status, data };
}

function errorText(result) {
  return (result.data && result.data.error && result.data.error.message) || `HTTP ${result.status}`;
}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) {
    if (cell instanceof Node) { const td = el("td"); td.appendChild(cell); tr.appendChild(td); }
    else tr.appendChild(el("td", cell));
  }
  return tr;
}

function fill(tableId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
}

const usd = (value) => {
  const amount = Number(value || 0);
  if (amount !== 0 && Math.abs(amount) < 1e-6) return "$" + amount.toExponential(2); // a local tier's fraction of a cent
  return "$" + amount.toFixed(Math.abs(amount) >= 1 ? 2 : 6);
};
const ms = (seconds) => (Number(seconds || 0) * 1000).toFixed(1) + " ms";

// --- login ---

function showLogin() {
  csrf = null;
  if (timer) { clearInterval(timer); timer = null; }
  $("dashboard").hidden = true;
  $("login").hidden = false;
}

function showDashboard(session) {
  csrf = session.csrf;
  $("login").hidden = true;
  $("dashboard").hidden = false;
  refresh();
  loadPolicyText();
  if (!timer) timer = setInterval(refresh, POLL_MS);
}

async function login(event) {
  event.preventDefault();
  const result = await api("POST", "/admin/login", { key: $("login-key").value });
  $("login-key").value = "";
  if (!result.ok) { $("login-error").textContent = errorText(result); return; }
  $("login-error").textContent = "";
  showDashboard(result.data);
}

async function logout() {
  await api("POST", "/admin/logout");
  showLogin();
}

// --- charts (hand-written SVG) ---

function lineChart(svgId, legendId, buckets, field) {
  const svg = $(svgId);
  const width = 600, height = 180, pad = 24;
  const names = [...new Set(buckets.flatMap((bucket) => Object.keys(bucket[field])))].sort();
  const peak = Math.max(1, ...buckets.flatMap((bucket) => Object.values(bucket[field])));
  const nodes = [];
  const axis = document.createElementNS(SVG, "path");
  axis.setAttribute("d", `M${pad} ${pad / 2} V${height - pad} H${width - 4}`);
  axis.setAttribute("stroke", "#9aa1ab"); axis.setAttribute("fill", "none");
  nodes.push(axis);
  const label = document.createElementNS(SVG, "text");
  label.setAttribute("x", 2); label.setAttribute("y", pad / 2 + 8); label.setAttribute("font-size", "10");
  label.textContent = String(peak);
  nodes.push(label);
  const step = (width - pad - 8) / Math.max(1, buckets.length - 1);
  names.forEach((name, index) => {
    const points = buckets.map((bucket, at) => {
      const value = bucket[field][name] || 0;
      const y = height - pad - (value / peak) * (height - pad * 1.5);
      return `${(pad + at * step).toFixed(1)},${y.toFixed(1)}`;
    });
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[index % COLORS.length]);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("data-series", name);
    nodes.push(line);
  });
  const caption = document.createElementNS(SVG, "text");
  caption.setAttribute("x", pad); caption.setAttribute("y", height - 6); caption.setAttribute("font-size", "10");
  caption.textContent = `last ${buckets.length} × 10 s`;
  nodes.push(caption);
  svg.replaceChildren(...nodes);
  $(legendId).replaceChildren(...names.map((name, index) => {
    const item = el("span");
    const swatch = el("i"); swatch.style.background = COLORS[index % COLORS.length];
    const total = buckets.reduce((sum, bucket) => sum + (bucket[field][name] || 0), 0);
    item.append(swatch, `${name || "(no model)"} (${total})`); // listings and feedback name no model
    return item;
  }));
}

function barChart(svgId, money) {
  const svg = $(svgId);
  const entries = Object.entries(money);
  const width = 600, height = 160, pad = 20;
  const peak = Math.max(1e-12, ...entries.map(([, figures]) => figures.top_tier_usd));
  const slot = (width - pad) / Math.max(1, entries.length);
  const nodes = [];
  entries.forEach(([name, figures], index) => {
    const x = pad + index * slot;
    [["top_tier_usd", "#c5cad3"], ["cost_usd", "#1f77b4"]].forEach(([field, color], inner) => {
      const h = (figures[field] / peak) * (height - pad * 2);
      const bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("x", (x + inner * slot * 0.35).toFixed(1));
      bar.setAttribute("y", (height - pad - h).toFixed(1));
      bar.setAttribute("width", (slot * 0.33).toFixed(1));
      bar.setAttribute("height", h.toFixed(1));
      bar.setAttribute("fill", color);
      nodes.push(bar);
    });
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("x", x); text.setAttribute("y", height - 5); text.setAttribute("font-size", "11");
    text.textContent = `${name || "(no team)"}: saved ${usd(figures.saved_usd)}`;
    nodes.push(text);
  });
  svg.replaceChildren(...nodes);
}

// --- panels ---

function moneyRows(money) {
  return Object.entries(money).map(([name, figures]) =>
    row([name || "(no team)", figures.requests, usd(figures.cost_usd), usd(figures.top_tier_usd), usd(figures.saved_usd)]));
}

// A local model's load first (sequences decoding of those it can decode at once, requests waiting: its queue
// depth, tokens/s over the last seconds when it batches), then the backend's other scalar figures.
function figuresOf(status) {
  const shown = [];
  const skip = new Set(["state"]);
  if (status.active !== undefined && status.parallel !== undefined) {
    shown.push(`decoding=${status.active}/${status.parallel}`);
    ["active", "parallel", "busy"].forEach((key) => skip.add(key));
  }
  for (const key of ["waiting", "tokens_per_s"]) {
    if (status[key] !== undefined) { shown.push(`${key}=${status[key]}`); skip.add(key); }
  }
  const rest = Object.entries(status).filter(([key, value]) => !skip.has(key) && value !== null && typeof value !== "object");
  return [...shown, ...rest.map(([key, value]) => `${key}=${value}`)].slice(0, 6).join(" ");
}

const percent = (rate) => (Number(rate || 0) * 100).toFixed(0) + "%";

function renderFeedback(feedback) {
  $("feedback-days").textContent = feedback.days;
  $("feedback-total").textContent = feedback.ok + feedback.not_ok;
  $("feedback-not-ok").textContent = feedback.not_ok;
  $("feedback-rate").textContent = percent(feedback.not_ok_rate);
  fill("feedback", feedback.tiers.map((tier) =>
    row([tier.model, tier.backend, tier.ok, tier.not_ok, percent(tier.not_ok_rate)])));
}

function renderSummary(summary) {
  $("status").textContent = summary.status;
  $("status").classList.toggle("bad", summary.status !== "ready");
  $("policy-version").textContent = summary.policy;
  $("count-requests").textContent = summary.requests;
  $("count-errors").textContent = summary.errors;
  $("escalation-rate").textContent = percent(summary.escalation_rate);
  $("escalated").textContent = summary.escalated;
  $("cascaded").textContent = summary.cascaded;
  const totals = Object.values(summary.teams).reduce((sum, figures) => {
    sum.cost += figures.cost_usd; sum.top += figures.top_tier_usd; sum.saved += figures.saved_usd; return sum;
  }, { cost: 0, top: 0, saved: 0 });
  $("money-cost").textContent = usd(totals.cost);
  $("money-top").textContent = usd(totals.top);
  $("money-saved").textContent = usd(totals.saved);
  lineChart("chart-models", "legend-models", summary.buckets, "models");
  lineChart("chart-tiers", "legend-tiers", summary.buckets, "tiers");
  barChart("chart-teams", summary.teams);
  fill("money-teams", moneyRows(summary.teams));
  fill("money-models", moneyRows(summary.models));
  fill("reasons", Object.entries(summary.reasons).map(([reason, times]) => row([reason, times])));
  renderFeedback(summary.feedback);
  const names = [...new Set([...Object.keys(summary.backends), ...Object.keys(summary.latency)])].sort();
  fill("backends", names.map((name) => {
    const status = summary.backends[name] || { state: "not in the policy now" };
    const latency = summary.latency[name] || { calls: 0, errors: 0, p50_s: 0, p95_s: 0, tokens_per_s: 0 };
    const circuit = summary.circuits[name];
    const toggle = el("button", String(status.state).startsWith("disabled") ? "Enable" : "Disable", { type: "button" });
    toggle.dataset.backend = name;
    toggle.addEventListener("click", () => toggleBackend(name, toggle.textContent === "Enable"));
    return row([name, status.state, typeof circuit === "string" ? circuit : circuit ? (circuit.state || JSON.stringify(circuit)) : "closed", latency.calls,
      latency.errors, ms(latency.p50_s), ms(latency.p95_s), latency.tokens_per_s.toFixed(1), figuresOf(status), toggle]);
  }));
}

function trail(attempts) {
  return attempts.map((attempt) => `${attempt.backend}:${attempt.outcome}`).join(",");
}

function renderRequests(traces) {
  fill("requests", traces.map((trace) => {
    // A request without a model (a listing, a feedback label) shows its endpoint instead.
    const tr = row([new Date(trace.created * 1000).toLocaleTimeString(), trace.model || trace.endpoint, trace.team, trail(trace.attempts),
      trace.backend, ms(trace.duration_s), usd(trace.cost_usd), trace.cache || "-", trace.status]);
    tr.dataset.id = trace.id;
    tr.addEventListener("click", () => showTrace(trace.id));
    return tr;
  }));
}

async function showTrace(id) {
  const result = await api("GET", "/admin/requests/" + encodeURIComponent(id));
  $("trace").hidden = false;
  $("trace").textContent = result.ok ? JSON.stringify(result.data, null, 2) : errorText(result);
}

function renderPolicy(policy) {
  $("policy-version-2").textContent = policy.version;
  $("policy-source").textContent = policy.file ? `(${policy.file})` : "";
  policyText = policy.text || "";
  fill("history", policy.history.map((entry) => row([new Date(entry.at * 1000).toLocaleTimeString(), entry.trigger,
    entry.result, entry.version || "", entry.summary || entry.error || ""])));
}

function renderKeys(keys) {
  fill("keys", keys.map((key) => {
    const revoke = el("button", "Revoke", { type: "button" });
    revoke.disabled = key.revoked_at !== null;
    revoke.addEventListener("click", () => revokeKey(key.id));
    const edit = el("button", "Limits", { type: "button" });
    edit.disabled = key.revoked_at !== null;
    edit.addEventListener("click", () => editLimits(key));
    const budget = key.budget_usd === null ? "-" : `${usd(key.budget_usd)}/${key.budget_period}`;
    return row([key.id, key.name, key.team, key.prefix, key.rpm ?? "-", key.tpm ?? "-", budget,
      key.revoked_at ? "revoked" : "active", edit, revoke]);
  }));
}

async function refresh() {
  const [summary, requests, policy, keys] = await Promise.all([
    api("GET", "/admin/summary"), api("GET", "/admin/requests?limit=25"), api("GET", "/admin/policy"),
    api("GET", "/admin/keys"),
  ]);
  if (!csrf) return;
  if (summary.ok) renderSummary(summary.data);
  if (requests.ok) renderRequests(requests.data.data);
  if (policy.ok) renderPolicy(policy.data);
  if (keys.ok) renderKeys(keys.data.data);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

// --- actions ---

async function reloadPolicy() {
  const result = await api("POST", "/admin/policy/reload");
  $("reload-result").textContent = result.ok ? `reloaded: ${result.data.result} ${result.data.version || ""}` : errorText(result);
  refresh();
}

function loadPolicyText() {
  api("GET", "/admin/policy").then((result) => {
    if (result.ok) $("policy-text").value = result.data.text || `# ${result.data.text_withheld || "no text"}`;
  });
}

function showPolicyErrors(message, text) {
  const lines = text.split("\n");
  const items = message.split("\n").filter((line) => line.trim() && !line.startsWith("the policy was not applied"));
  $("policy-errors").replaceChildren(...items.map((item) => {
    const found = /:(\d+):/.exec(item);
    const li = el("li", item);
    if (found) {
      li.dataset.line = found[1];
      li.appendChild(el("code", `line ${found[1]}: ${lines[Number(found[1]) - 1] ?? ""}`));
    }
    return li;
  }));
}

async function applyPolicy(text) {
  const result = await api("PUT", "/admin/policy", text, "application/yaml");
  if (result.ok) {
    $("policy-errors").replaceChildren(el("li", `applied: ${result.data.result} ${result.data.version || ""}`));
    $("policy-errors").classList.remove("error");
  } else {
    $("policy-errors").classList.add("error");
    showPolicyErrors(errorText(result), text);
  }
  refresh();
  return result;
}

async function toggleBackend(name, enable) {
  const current = await api("GET", "/admin/policy");
  const text = current.ok ? current.data.text : null;
  if (!text) {
    $("backend-error").textContent = "the running policy's text cannot be edited here: " +
      ((current.data && current.data.text_withheld) || errorText(current));
    return;
  }
  const edited = setEnabled(text, name, enable);
  if (edited === null) { $("backend-error").textContent = `backend '${name}' not found in the policy text`; return; }
  const result = await applyPolicy(edited);
  $("backend-error").textContent = result.ok ? "" : errorText(result);
}

// Sets `enabled:` of one backend in the policy YAML, keeping the rest of the text as written. Handles a backend
// written as a block (`name:` then indented fields) or in flow style (`name: {type: ..., ...}`).
function setEnabled(text, name, enable) {
  const lines = text.split("\n");
  const start = lines.findIndex((line) => /^backends:\s*$/.test(line));
  if (start < 0) return null;
  for (let index = start + 1; index < lines.length && !/^\S/.test(lines[index]); index++) {
    const match = new RegExp(`^(\\s+)${name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}:\\s*(.*)$`).exec(lines[index]);
    if (!match) continue;
    const [, indent, rest] = match;
    if (rest.startsWith("{")) {
      // Only the top level's `enabled:` is touched: nested maps (price: {...}) keep their commas.
      let body = rest.replace(/^\{\s*enabled:\s*(true|false)\s*,\s*/, "{").replace(/,\s*enabled:\s*(true|false)\s*\}\s*$/, "}");
      if (!enable) body = "{enabled: false, " + body.slice(1);
      lines[index] = `${indent}${name}: ${body}`;
      return lines.join("\n");
    }
    let end = index + 1;
    let fieldIndent = indent + "  ";
    while (end < lines.length && (lines[end].trim() === "" || lines[end].startsWith(indent + " "))) {
      if (lines[end].trim()) fieldIndent = /^\s*/.exec(lines[end])[0];
      if (/^\s*enabled:/.test(lines[end]) && lines[end].startsWith(fieldIndent)) { lines.splice(end, 1); continue; }
      end++;
    }
    if (!enable) lines.splice(index + 1, 0, `${fieldIndent}enabled: false`);
    return lines.join("\n");
  }
  return null;
}

async function createKey(event) {
  event.preventDefault();
  const body = { name: $("key-name").value, team: $("key-team").value };
  const number = (id) => ($(id).value.trim() === "" ? undefined : Number($(id).value));
  if (number("key-rpm") !== undefined) body.rpm = number("key-rpm");
  if (number("key-tpm") !== undefined) body.tpm = number("key-tpm");
  if (number("key-budget") !== undefined) { body.budget_usd = number("key-budget"); body.budget_period = $("key-period").value; }
  const result = await api("POST", "/admin/keys", body);
  if (!result.ok) { $("key-error").textContent = errorText(result); return; }
  $("key-error").textContent = "";
  $("key-plain").textContent = result.data.key; // shown once: the gateway keeps only its hash
  $("key-new").hidden = false;
  refresh();
}

function editLimits(key) {
  $("limits-id").textContent = key.id;
  $("limits-rpm").value = key.rpm ?? "";
  $("limits-tpm").value = key.tpm ?? "";
  $("limits-budget").value = key.budget_usd ?? "";
  $("limits-period").value = key.budget_period;
  $("limits-form").hidden = false;
}

async function saveLimits(event) {
  event.preventDefault();
  const value = (id) => ($(id).value.trim() === "" ? null : Number($(id).value)); // empty: no limit of its own
  const body = { rpm: value("limits-rpm"), tpm: value("limits-tpm"), budget_usd: value("limits-budget"),
    budget_period: $("limits-period").value };
  const result = await api("PATCH", "/admin/keys/" + encodeURIComponent($("limits-id").textContent), body);
  $("key-error").textContent = result.ok ? "" : errorText(result);
  if (result.ok) $("limits-form").hidden = true;
  refresh();
}

async function revokeKey(id) {
  const result = await api("DELETE", "/admin/keys/" + encodeURIComponent(id));
  $("key-error").textContent = result.ok ? "" : errorText(result);
  refresh();
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("reload").addEventListener("click", reloadPolicy);
  $("policy-load").addEventListener("click", loadPolicyText);
  $("policy-apply").addEventListener("click", () => applyPolicy($("policy-text").value));
  $("policy-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) $("policy-text").value = await file.text();
  });
  $("key-form").addEventListener("submit", createKey);
  $("limits-form").addEventListener("submit", saveLimits);
  const session = await api("GET", "/admin/session");
  if (session.ok) showDashboard(session.data); else showLogin();
});
