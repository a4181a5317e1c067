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
    $("#console").hidden = true;
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

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "never";
}

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
      el("td", {}, d.state),
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

async function loadAlerts() {
  const { alerts } = await api("/api/alerts");
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
      el("td", {}, note, " ", el("button", { type: "button", class: "ack", onclick: ack }, "Acknowledge")),
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
}

async function refresh() {
  try {
    await Promise.all([loadStatus(), loadDevices(), loadAlerts(), loadQuarantine(), loadFeeds()]);
    $("#console").hidden = false;
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
      const response = await api("/api/planning.csv", { raw: true });
      const url = URL.createObjectURL(await response.blob());
      el("a", { href: url, download: "care-sync-planning.csv" }).click();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      say(e.message, true);
    }
  });

  if (token()) refresh();
  refreshTimer = setInterval(() => {
    if (token() && !$("#console").hidden) refresh();
  }, 10000);
}

document.addEventListener("DOMContentLoaded", start);
