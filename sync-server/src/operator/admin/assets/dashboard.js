// care-sync operators' console. Plain JavaScript, no dependencies, nothing fetched from
// anywhere but this server. The operator token is kept in sessionStorage (gone with the tab).
"use strict";

const $ = (selector) => document.querySelector(selector);
let refreshTimer = null;

function token() {
  return sessionStorage.getItem("care-sync-token") || "";
}

function say(text, isError = false) {
  const box = $("#message");
  box.textContent = text;
  box.className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const headers = { Authorization: "Bearer " + token() };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (response.status === 401) {
    showSignedOut();
    throw new Error("The operator token was not accepted.");
  }
  if (options.raw) {
    if (!response.ok) throw new Error("HTTP " + response.status);
    return response;
  }
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || "HTTP " + response.status);
  return data;
}

// Builds an element; children are strings (as text, never HTML) or nodes.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  }
  return node;
}

// Every time on the page in one form, in UTC (as the CLI and the audit show them).
function when(iso) {
  if (!iso) return "never";
  const t = new Date(iso);
  return isNaN(t) ? iso : t.toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

function showSignedOut() {
  $("#console").hidden = true;
  $("#sign-out").hidden = true;
  $("#token-form").hidden = false;
  if (refreshTimer) clearInterval(refreshTimer);
  refreshTimer = null;
}

function showSignedIn() {
  $("#console").hidden = false;
  $("#sign-out").hidden = false;
  $("#token-form").hidden = true;
  if (!refreshTimer) refreshTimer = setInterval(refresh, 10000);
}

const STATE_TEXT = {
  "wipe-requested": "wipe pending",
  "revoked-wipe-requested": "revoked · wipe pending",
};

function fill(tbody, rows, columns) {
  tbody.replaceChildren(...rows);
  if (rows.length === 0) {
    tbody.append(el("tr", {}, el("td", { colspan: String(columns), class: "empty" }, "none")));
  }
}

async function loadStatus() {
  const s = await api("/api/status");
  $("#status").replaceChildren(
    ...[
      ["patients", s.patients],
      ["devices", s.devices],
      ["connected now", s.connected_devices],
      ["open alerts", s.open_alerts],
    ].map(([label, value]) => el("div", {}, el("strong", {}, String(value)), label)),
  );
}

async function loadDevices() {
  const { devices } = await api("/api/devices");
  const rows = devices.map((d) => {
    const actions = el("td");
    if (d.state === "enrolled" || d.state === "pending") {
      actions.append(
        el("button", { type: "button", class: "danger revoke", onclick: () => act(d.name, "revoke") }, "Revoke"),
      );
    }
    if (d.state === "enrolled") {
      actions.append(
        " ",
        el("button", { type: "button", class: "danger wipe", onclick: () => act(d.name, "wipe") }, "Wipe"),
      );
    }
    return el(
      "tr",
      { "data-device": d.name, class: [d.state, d.stale ? "stale" : ""].join(" ") },
      el("td", {}, d.name),
      el("td", {}, d.role),
      el("td", {}, STATE_TEXT[d.state] ? el("span", { class: "badge" }, STATE_TEXT[d.state]) : d.state),
      el("td", {}, when(d.last_sync)),
      el("td", { class: d.lease === "expired" ? "expired" : "" }, d.lease),
      el("td", {}, String(d.documents_held) + (d.left_out ? ` (+${d.left_out} over budget)` : "")),
      actions,
    );
  });
  fill($("#devices tbody"), rows, 7);
}

async function act(name, action) {
  const question = action === "revoke"
    ? `Revoke ${name}? Its next connection will be refused.`
    : `Wipe ${name}? It destroys its data key and patient data at its next contact.`;
  if (!confirm(question)) return;
  try {
    await api(`/api/devices/${encodeURIComponent(name)}/${action}`, { method: "POST", body: {} });
    say(`${name}: ${action} recorded.`);
    await refresh();
  } catch (e) {
    say(e.message, true);
  }
}

async function loadScopes() {
  const { scopes } = await api("/api/scopes");
  const ids = (list) => el("div", { class: "ids" }, list.slice(0, 5).join(" ") + (list.length > 5 ? " …" : ""));
  const rows = scopes.map((s) =>
    el(
      "tr",
      { "data-scope": s.device },
      el("td", {}, s.device),
      el("td", {}, `${s.caseload.length} patient(s)`, ids(s.caseload)),
      el("td", {}, `${s.incidents.length}`, ids(s.incidents.map((i) => `${i.patient} until ${when(i.expires_at)}`))),
      el("td", {}, s.areas.join(", ") || "none"),
      el("td", {}, s.budget === null || s.budget === undefined ? "region default" : String(s.budget)),
    ),
  );
  fill($("#scopes tbody"), rows, 5);
}

async function loadSettings() {
  const { settings } = await api("/api/settings");
  const rows = settings.map((s) =>
    el(
      "tr",
      { "data-setting": s.name },
      el("td", {}, s.name),
      el("td", {}, s.value),
      el("td", {}, s.source),
      el("td", {}, s.default),
      el("td", {}, s.description),
    ),
  );
  fill($("#settings tbody"), rows, 5);
  const select = $("#setting-name");
  if (select.options.length === 0) {
    select.replaceChildren(...settings.map((s) => el("option", { value: s.name }, s.name)));
  }
}

async function loadAlerts() {
  const all = $("#alerts-all").checked;
  const { alerts } = await api(all ? "/api/alerts?all=true" : "/api/alerts");
  const rows = alerts.map((a) => {
    const note = el("input", { class: "ack-note", placeholder: "note (required)", "aria-label": "note" });
    const ack = async () => {
      if (!note.value.trim()) {
        say("An acknowledgement needs a note.", true);
        return;
      }
      try {
        await api(`/api/alerts/${a.id}/ack`, { method: "POST", body: { note: note.value } });
        say(`Alert ${a.id} acknowledged.`);
        await refresh();
      } catch (e) {
        say(e.message, true);
      }
    };
    return el(
      "tr",
      { "data-alert": String(a.id) },
      el("td", {}, String(a.id)),
      el("td", {}, when(a.at)),
      el("td", {}, a.kind),
      el("td", {}, a.device || ""),
      el("td", {}, a.patient || ""),
      el("td", {}, a.reason_sealed ? sealedReason(a.id) : a.reason),
      el(
        "td",
        {},
        a.acknowledged_at
          ? `acknowledged ${when(a.acknowledged_at)}: ${a.note || ""}`
          : el("span", {}, note, " ", el("button", { type: "button", class: "ack", onclick: ack }, "Acknowledge")),
      ),
    );
  });
  fill($("#alerts tbody"), rows, 7);
}

// A clinician's free-text reason is shown only when asked for; the look is audited.
function sealedReason(id) {
  const cell = el("span", { class: "sealed" });
  const show = async () => {
    try {
      const { reason } = await api(`/api/alerts/${id}/reason`, { method: "POST", body: {} });
      cell.replaceChildren(document.createTextNode(reason));
    } catch (e) {
      say(e.message, true);
    }
  };
  cell.append(el("button", { type: "button", class: "show-reason", onclick: show }, "Show reason (audited)"));
  return cell;
}

async function loadQuarantine() {
  const { quarantine } = await api("/api/quarantine");
  const rows = quarantine.slice(0, 100).map((q) => {
    const note = el("input", { class: "review-note", placeholder: "note (required)", "aria-label": "review note" });
    const review = async () => {
      if (!note.value.trim()) {
        say("A review needs a note.", true);
        return;
      }
      try {
        await api(`/api/quarantine/${q.id}/review`, { method: "POST", body: { note: note.value } });
        say(`Quarantined upload ${q.id} reviewed.`);
        await refresh();
      } catch (e) {
        say(e.message, true);
      }
    };
    return el(
      "tr",
      { "data-quarantine": String(q.id) },
      el("td", {}, when(q.at)),
      el("td", {}, q.device),
      el("td", {}, q.patient),
      el("td", {}, q.rule),
      el("td", {}, q.place),
      el("td", {}, String(q.changes)),
      el("td", {}, note, " ", el("button", { type: "button", class: "review", onclick: review }, "Reviewed")),
    );
  });
  fill($("#quarantine tbody"), rows, 7);
}

async function loadFeeds() {
  const { mllp } = await api("/api/feeds");
  const last = mllp.last_error;
  const pairs = [
    ["accepted (AA)", String(mllp.accepted)],
    ["errors (AE)", String(mllp.errors)],
    ["rejected (AR)", String(mllp.rejected)],
    ["last message", when(mllp.last_message_at)],
    ["last refusal", last ? `${when(last.at)} — ${last.code}: ${last.reason}` : "none"],
  ];
  $("#feeds").replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const rows = (mllp.recent_refusals || []).slice(0, 20).map((r) =>
    el("tr", {}, el("td", {}, when(r.at)), el("td", {}, r.code), el("td", {}, r.control_id || "—"), el("td", {}, r.reason)),
  );
  fill($("#feed-refusals tbody"), rows, 4);
}

async function refresh() {
  try {
    await Promise.all([
      loadStatus(),
      loadDevices(),
      loadScopes(),
      loadSettings(),
      loadAlerts(),
      loadQuarantine(),
      loadFeeds(),
    ]);
    showSignedIn();
  } catch (e) {
    say(e.message, true);
  }
}

function start() {
  $("#token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    sessionStorage.setItem("care-sync-token", $("#token-input").value.trim());
    $("#token-input").value = "";
    say("");
    await refresh();
    if (!$("#console").hidden) say("Signed in.");
  });

  $("#sign-out").addEventListener("click", () => {
    sessionStorage.removeItem("care-sync-token");
    showSignedOut();
    say("Signed out.");
  });

  $("#alerts-all").addEventListener("change", () => refresh());

  $("#scope-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const action = $("#scope-action").value;
    const device = $("#scope-device").value.trim();
    const value = $("#scope-value").value.trim();
    const body = action.startsWith("areas") ? { device, district: value } : { device, nhs: value };
    try {
      const result = await api(`/api/${action}`, { method: "POST", body });
      $("#scope-value").value = "";
      say(`${device}: ${$("#scope-action").selectedOptions[0].textContent}${result.changed === false ? " (no change)" : ""}.`);
      await refresh();
    } catch (e) {
      say(e.message, true);
    }
  });

  $("#setting-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("#setting-name").value;
    try {
      await api("/api/settings", { method: "POST", body: { name, value: $("#setting-value").value.trim() } });
      $("#setting-value").value = "";
      say(`${name} changed.`);
      await refresh();
    } catch (e) {
      say(e.message, true);
    }
  });

  $("#enrol-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("#enrol-name").value.trim();
    try {
      const result = await api("/api/devices", {
        method: "POST",
        body: { name, role: $("#enrol-role").value, expires_in_hours: Number($("#enrol-hours").value) },
      });
      $("#enrol-for").textContent = name;
      $("#enrol-token").textContent = result.token;
      $("#enrol-result").hidden = false;
      $("#enrol-name").value = "";
      say(`Token issued for ${name}; valid until ${when(result.expires_at)}.`);
      await refresh();
    } catch (e) {
      say(e.message, true);
    }
  });

  $("#audit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("#audit-nhs").value.trim();
    try {
      const { entries, total } = await api("/api/audit?nhs=" + encodeURIComponent(key));
      const rows = entries.map((a) =>
        el("tr", {}, el("td", {}, when(a.at)), el("td", {}, a.actor), el("td", {}, a.action), el("td", {}, a.detail)),
      );
      fill($("#audit-results tbody"), rows, 4);
      $("#audit-results").hidden = false;
      say(`${total} audit entr${total === 1 ? "y" : "ies"} for that patient.`);
    } catch (e) {
      say(e.message, true);
    }
  });

  $("#planning-download").addEventListener("click", async () => {
    try {
      const by = encodeURIComponent($("#planning-by").value);
      const response = await api(`/api/planning.csv?by=${by}`, { raw: true });
      const cells = response.headers.get("X-Planning-Cells");
      const hidden = response.headers.get("X-Planning-Suppressed-Cells");
      say(`Planning CSV: ${cells} cells, ${hidden} suppressed (1–7 patients).`);
      const url = URL.createObjectURL(await response.blob());
      el("a", { href: url, download: "care-sync-planning.csv" }).click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      say(e.message, true);
    }
  });

  if (token()) refresh();
  else showSignedOut();
}

document.addEventListener("DOMContentLoaded", start);
