// Status page of the provisioner admin API: polls the JSON API with the bearer token.
// The token comes from the URL fragment (/#token=...; never sent to the server in a URL)
// or from the sign-in field, and is kept in sessionStorage for this tab only.
// All remote text goes into the page via textContent, never innerHTML: node identities and
// error messages come from the network.
"use strict";

(function () {
  const STORAGE_KEY = "provisioner-admin-token";
  let token = null;
  let intervalMs = 2000;
  let timer = null;

  function byId(id) { return document.getElementById(id); }

  function readFragment() {
    const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    if (params.get("interval")) {
      const v = parseInt(params.get("interval"), 10);
      if (v >= 200) { intervalMs = v; }
    }
    if (params.get("token")) {
      token = params.get("token");
      sessionStorage.setItem(STORAGE_KEY, token);
      params.delete("token");
      const rest = params.toString();
      // Drop the token from the address bar and history.
      history.replaceState(null, "", window.location.pathname + (rest ? "#" + rest : ""));
    } else {
      token = sessionStorage.getItem(STORAGE_KEY);
    }
  }

  function showError(text) {
    const el = byId("error");
    el.textContent = text;
    el.hidden = !text;
  }

  function showLogin(show) { byId("login").hidden = !show; }

  async function api(path, method) {
    const res = await fetch("/api/v1" + path, {
      method: method || "GET",
      headers: { "Authorization": "Bearer " + (token || "") },
      cache: "no-store",
    });
    if (res.status === 401) {
      const err = new Error("unauthorized: enter the admin token");
      err.unauthorized = true;
      throw err;
    }
    if (!res.ok) { throw new Error(path + ": HTTP " + res.status); }
    return res.json();
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    row.appendChild(td);
    return td;
  }

  function safeId(text) { return String(text).replace(/[^A-Za-z0-9_-]/g, "-"); }

  function renderStatus(st) {
    const leader = byId("leader");
    leader.dataset.value = String(st.leader);
    leader.textContent = st.leader ? "leader" : "standby";
    const paused = byId("paused");
    paused.dataset.value = String(st.paused);
    paused.textContent = st.paused ? "paused" : "running";
    byId("queue-waiting").textContent = String(st.queue.waiting);
    byId("queue-in-flight").textContent = String(st.queue.in_flight);
    byId("count-total").textContent = String(st.total);
    const body = byId("counts-body");
    const rows = [];
    for (const [state, n] of Object.entries(st.counts)) {
      const tr = document.createElement("tr");
      tr.className = "state-" + safeId(state);
      cell(tr, state);
      const td = cell(tr, String(n), "num");
      td.id = "count-" + safeId(state);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // The chart area inside the SVG's 600 x 140 view box (labels sit left and below).
  const CHART = { left: 40, right: 600, top: 10, bottom: 120 };
  const MAX_POINTS = 1440;

  function count(v) {
    const n = Number(v);
    return Number.isFinite(n) && n > 0 ? n : 0;
  }

  function duration(seconds) {
    return seconds >= 60 && seconds % 60 === 0 ? (seconds / 60) + " min" : seconds + " s";
  }

  // Draws status.throughput ({interval, points: [{t, count}]}, oldest first) as a line.
  function renderThroughput(tp) {
    const line = byId("throughput-line");
    if (!tp || !Array.isArray(tp.points) || tp.points.length === 0) {
      line.setAttribute("points", "");
      byId("throughput-area").setAttribute("points", "");
      return;
    }
    const counts = tp.points.slice(-MAX_POINTS).map(function (p) { return count(p && p.count); });
    const peak = Math.max.apply(null, counts);
    const top = Math.max(1, peak);
    const width = CHART.right - CHART.left;
    const height = CHART.bottom - CHART.top;
    const step = counts.length > 1 ? width / (counts.length - 1) : 0;
    const xy = counts.map(function (c, i) {
      const x = CHART.left + i * step;
      const y = CHART.bottom - (c / top) * height;
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    line.setAttribute("points", xy.join(" "));
    line.dataset.count = String(counts.length);
    line.dataset.peak = String(peak);
    const area = [CHART.left + "," + CHART.bottom].concat(xy, [
      (CHART.left + (counts.length - 1) * step).toFixed(1) + "," + CHART.bottom,
    ]);
    byId("throughput-area").setAttribute("points", area.join(" "));
    const interval = count(tp.interval);
    byId("throughput-max").textContent = String(top);
    byId("throughput-peak").textContent = String(peak);
    byId("throughput-total").textContent = String(counts.reduce(function (a, b) { return a + b; }, 0));
    if (interval > 0) {
      byId("throughput-interval").textContent = duration(interval);
      byId("throughput-window").textContent = duration(interval * counts.length);
      byId("throughput-start").textContent = "-" + duration(interval * counts.length);
    }
  }

  function renderOverlays(data) {
    const rows = data.overlays.map(function (ov) {
      const tr = document.createElement("tr");
      tr.id = "overlay-" + safeId(ov.name);
      cell(tr, ov.name);
      cell(tr, ov.state);
      const td = document.createElement("td");
      td.className = "fill";
      const fill = count(ov.fill);
      const bar = document.createElement("div");
      bar.className = "bar" + (fill >= 1 ? " full" : "");
      bar.id = "overlay-bar-" + safeId(ov.name);
      bar.dataset.fill = String(fill);
      bar.title = Math.round(fill * 100) + "%";
      const inner = document.createElement("div");
      inner.style.width = Math.min(100, fill * 100).toFixed(2) + "%";
      bar.appendChild(inner);
      td.appendChild(bar);
      const pct = document.createElement("span");
      pct.className = "fill-pct";
      pct.textContent = Math.round(fill * 100) + "%";
      td.appendChild(pct);
      tr.appendChild(td);
      const n = cell(tr, ov.count + " / " + ov.capacity, "num");
      n.id = "overlay-count-" + safeId(ov.name);
      return tr;
    });
    byId("overlays-body").replaceChildren(...rows);
  }

  function renderFailures(data) {
    const nodes = data.nodes.slice().sort(function (a, b) {
      return (b.state_since || 0) - (a.state_since || 0);
    });
    byId("failures-total").textContent = "(" + data.total + ")";
    const rows = nodes.map(function (n) {
      const tr = document.createElement("tr");
      tr.className = "failure";
      tr.dataset.identity = n.identity;
      cell(tr, n.identity, "identity");
      cell(tr, String(n.attempts), "num");
      cell(tr, n.state_since ? new Date(n.state_since * 1000).toLocaleTimeString() : "");
      cell(tr, n.last_error || "", "reason");
      return tr;
    });
    byId("failures-body").replaceChildren(...rows);
  }

  // Fleet operations jobs (newest first): absent or unavailable engine leaves the table empty.
  async function refreshJobs() {
    let data;
    try { data = await api("/jobs"); } catch (err) { data = { jobs: [] }; }
    const rows = data.jobs.slice().reverse().slice(0, 20).map(function (j) {
      const tr = document.createElement("tr");
      tr.id = "job-" + safeId(j.id);
      const c = j.counts || {};
      const ended = (c.done || 0) + (c.failed || 0) + (c.skipped || 0);
      cell(tr, j.id, "identity");
      cell(tr, j.kind);
      cell(tr, j.state);
      cell(tr, ended + " / " + j.total, "num");
      cell(tr, String(c.failed || 0), "num");
      return tr;
    });
    byId("jobs-body").replaceChildren(...rows);
  }

  async function refresh() {
    if (!token) { showLogin(true); return; }
    try {
      const [st, failed, ov] = await Promise.all([
        api("/status"), api("/nodes?state=failed&limit=50"), api("/overlays"),
      ]);
      renderStatus(st);
      renderThroughput(st.throughput);
      renderFailures(failed);
      renderOverlays(ov);
      refreshJobs();
      showLogin(false);
      showError("");
      byId("updated").textContent = new Date().toLocaleTimeString();
    } catch (err) {
      if (err.unauthorized) { showLogin(true); }
      showError(String(err.message || err));
    }
  }

  async function control(path) {
    try { await api(path, "POST"); } catch (err) { showError(String(err.message || err)); }
    refresh();
  }

  function start() {
    readFragment();
    byId("login-button").addEventListener("click", function () {
      token = byId("token-input").value;
      byId("token-input").value = "";
      sessionStorage.setItem(STORAGE_KEY, token);
      refresh();
    });
    byId("pause-button").addEventListener("click", function () { control("/pause"); });
    byId("resume-button").addEventListener("click", function () { control("/resume"); });
    byId("discover-button").addEventListener("click", function () { control("/discover"); });
    refresh();
    timer = setInterval(refresh, intervalMs);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
