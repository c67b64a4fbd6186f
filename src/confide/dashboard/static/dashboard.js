// The live view: keeps what the server-sent events bring, and redraws the page from it.
// Everything from the store is put in the page as text (textContent), never as HTML: site names, event
// messages and generated text are free text.
"use strict";

(function () {
  // The token came in the address once; the server keeps it in a cookie, so the address need not show it.
  if (window.location.search.includes("token=")) {
    window.history.replaceState(null, "", window.location.pathname);
  }

  const state = {
    status: "", config: {}, created: 0,
    rounds: new Map(), evaluations: new Map(), ledger: [], events: [], samples: [], sites: new Map(),
    quarantined: 0, lastUpdate: 0,
  };
  const MAX_EVENTS = 500;
  const MAX_SAMPLES = 50;
  const STATE_ORDER = ["working", "answered", "took part", "joined", "not asked yet", "dropped", "refused", "quarantined"];

  function take(delta) {
    if (delta.reset) {
      state.rounds.clear(); state.evaluations.clear(); state.sites.clear();
      state.ledger = []; state.events = []; state.samples = [];
      state.config = delta.config || {};
    }
    state.status = delta.status; state.created = delta.created; state.quarantined = delta.quarantined;
    for (const r of delta.rounds) state.rounds.set(r.round, r);
    for (const e of delta.evaluations) state.evaluations.set(e.round, e);
    for (const s of delta.sites) state.sites.set(s.site, s);
    state.ledger.push(...delta.ledger);
    state.events.push(...delta.events);
    state.samples.push(...delta.samples);
    if (state.events.length > MAX_EVENTS) state.events = state.events.slice(-MAX_EVENTS);
    if (state.samples.length > MAX_SAMPLES) state.samples = state.samples.slice(-MAX_SAMPLES);
    state.lastUpdate = Date.now();
    schedule();
  }

  let drawing = false;
  function schedule() {
    if (drawing) return;
    drawing = true;
    window.requestAnimationFrame(() => { drawing = false; draw(); });
  }

  // -- formatting ------------------------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  function num(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    return Number(x).toFixed(digits === undefined ? 3 : digits);
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }
  function ago(t) {
    if (!t) return "–";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return s.toFixed(0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }
  function clock(t) {
    return t ? new Date(t * 1000).toLocaleTimeString() : "–";
  }
  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }

  // -- plots -----------------------------------------------------------------------------------------
  // The x axis is the round in every plot (the captions say so); the legend sits at the foot of the figure,
  // in the bottom margin, which has room for two rows of it below the axis.
  const PLOT_LAYOUT = {
    margin: { l: 55, r: 55, t: 10, b: 72 }, height: 330, showlegend: true,
    legend: { orientation: "h", x: 0, xref: "container", y: 0, yref: "container", yanchor: "bottom", font: { size: 11 } },
    xaxis: { rangemode: "tozero", automargin: true },
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "#fbfbfd",
  };
  const PLOT_CONFIG = { displaylogo: false, displayModeBar: false };
  const COLOURS = { pooled: "#1f77b4", train: "#ff7f0e", site: "#2ca02c", worst: "#d62728", grey: "#7f7f7f" };

  function series(map, key) {
    const xs = [], ys = [];
    for (const [r, row] of [...map.entries()].sort((a, b) => a[0] - b[0])) {
      const v = row[key];
      if (v !== null && v !== undefined) { xs.push(r); ys.push(v); }
    }
    return [xs, ys];
  }
  function line(map, key, name, colour, extra) {
    const [x, y] = series(map, key);
    return Object.assign({ x, y, name, type: "scatter", mode: x.length > 40 ? "lines" : "lines+markers",
      line: { color: colour, width: 2 } }, extra || {});
  }
  function plot(id, traces, layout) {
    if (typeof Plotly === "undefined") return;
    const shown = traces.filter((t) => t.x.length > 0);
    const div = $(id);
    // Whole rounds on the x axis while there are few of them (plotly would put ticks at 0.5).
    const last = Math.max(0, ...state.rounds.keys());
    layout = Object.assign({ xaxis: Object.assign({}, PLOT_LAYOUT.xaxis, last <= 12 ? { dtick: 1 } : {}) }, layout || {});
    // The width of the box it is in, every time: the grid may have changed it since the last drawing.
    const size = div.clientWidth ? { width: div.clientWidth, autosize: false } : {};
    Plotly.react(div, shown, Object.assign({}, PLOT_LAYOUT, size, layout || {}), PLOT_CONFIG);
  }

  function drawPlots() {
    plot("plot-loss", [
      line(state.rounds, "train_loss", "train loss (sites)", COLOURS.train),
      line(state.evaluations, "loss", "eval loss (held-out)", COLOURS.pooled),
    ], { yaxis: { title: { text: "loss" } } });
    plot("plot-accuracy", [
      line(state.evaluations, "accuracy", "accuracy (pooled)", COLOURS.pooled),
      line(state.evaluations, "site_accuracy_p10", "accuracy, worst decile of sites", COLOURS.worst, { line: { color: COLOURS.worst, dash: "dot" } }),
      line(state.evaluations, "perplexity", "perplexity", COLOURS.site, { yaxis: "y2" }),
    ], {
      yaxis: { title: { text: "accuracy" }, rangemode: "tozero" },
      yaxis2: { title: { text: "perplexity" }, overlaying: "y", side: "right", showgrid: false },
    });
    const ledger = new Map();
    for (const c of state.ledger) ledger.set(c.round, c);  // the newest charge of each round
    const traces = [
      line(ledger, "epsilon", "epsilon the budget holds (ledger)", COLOURS.worst),
      line(state.evaluations, "epsilon_worst_site", "worst site (server knows who took part)", COLOURS.worst, { line: { color: COLOURS.worst, dash: "dot", width: 1.5 } }),
      line(state.evaluations, "epsilon_median_site", "median site (same server)", COLOURS.worst, { line: { color: COLOURS.worst, dash: "dashdot", width: 1.5 } }),
      line(state.evaluations, "epsilon_amplified", "amplified by sampling (sample secret)", COLOURS.pooled, { line: { color: COLOURS.pooled, dash: "dash", width: 1.5 } }),
      line(state.evaluations, "record_epsilon_max", "record-level (DP-SGD), worst site", COLOURS.site, { line: { color: COLOURS.site, dash: "dot", width: 1.5 } }),
    ];
    const budget = state.config["privacy.target_epsilon"];
    if (budget) {
      const last = Math.max(1, ...state.rounds.keys(), Number(state.config["run.rounds"] || 1));
      traces.push({ x: [0, last], y: [budget, budget], name: "budget " + budget, type: "scatter", mode: "lines",
        line: { color: COLOURS.grey, dash: "dash", width: 1.5 } });
    }
    plot("plot-privacy", traces, { yaxis: { title: { text: "epsilon" }, rangemode: "tozero" } });
    plot("plot-traffic", [
      Object.assign(line(state.rounds, "bytes_sent", "bytes sent", COLOURS.pooled), { type: "bar", marker: { color: COLOURS.pooled } }),
      Object.assign(line(state.rounds, "bytes_received", "bytes received", COLOURS.train), { type: "bar", marker: { color: COLOURS.train } }),
      line(state.rounds, "seconds", "seconds", COLOURS.worst, { yaxis: "y2" }),
    ], {
      barmode: "group",
      yaxis: { title: { text: "bytes" } },
      yaxis2: { title: { text: "seconds" }, overlaying: "y", side: "right", showgrid: false, rangemode: "tozero" },
    });
  }

  // -- panels ----------------------------------------------------------------------------------------
  function drawCards() {
    const rounds = [...state.rounds.keys()];
    const last = rounds.length ? Math.max(...rounds) : 0;
    $("round-now").textContent = last ? String(last) : "–";
    $("round-of").textContent = state.config["run.rounds"] ? "of " + state.config["run.rounds"] : "";
    const evals = [...state.evaluations.keys()];
    const e = evals.length ? state.evaluations.get(Math.max(...evals)) : null;
    $("accuracy-now").textContent = e ? num(e.accuracy) : "–";
    $("accuracy-round").textContent = e ? "after round " + e.round : "";
    $("loss-now").textContent = e ? num(e.loss) : "–";
    $("perplexity-now").textContent = e ? "perplexity " + num(e.perplexity, 2) : "";
    const charge = state.ledger.length ? state.ledger[state.ledger.length - 1] : null;
    const epsilon = charge ? charge.epsilon : (e ? e.epsilon : null);
    $("epsilon-now").textContent = epsilon === null || epsilon === undefined ? "–" : num(epsilon, 3);
    const budget = state.config["privacy.target_epsilon"];
    const delta = e && e.delta ? ", delta " + Number(e.delta).toExponential(1) : "";
    $("epsilon-budget").textContent = state.config["privacy.dp"] && state.config["privacy.dp"] !== "none"
      ? (budget ? "budget " + budget : "no budget") + delta : "no site-level DP";
    let sent = 0, received = 0, seconds = 0;
    for (const r of state.rounds.values()) { sent += r.bytes_sent; received += r.bytes_received; seconds += r.seconds || 0; }
    $("bytes-now").textContent = bytes(sent + received);
    $("seconds-now").textContent = "↑ " + bytes(sent) + " ↓ " + bytes(received) + " · " + num(seconds, 1) + " s";
    const counts = {};
    for (const s of state.sites.values()) counts[s.state] = (counts[s.state] || 0) + 1;
    $("sites-now").textContent = String(state.sites.size);
    $("sites-states").textContent = STATE_ORDER.filter((k) => counts[k]).map((k) => counts[k] + " " + k).join(" · ");
    $("sites-count").textContent = "(" + state.sites.size + ")";
    $("run-name").textContent = state.config["run.name"] ? "· " + state.config["run.name"] : "";
    const status = $("run-status");
    status.textContent = state.status || "starting";
    status.className = "badge " + (state.status || "").split(":")[0].replace(/[^a-z]/g, "");
  }

  function drawSites() {
    const body = $("sites").tBodies[0];
    const rows = [...state.sites.values()].sort((a, b) =>
      STATE_ORDER.indexOf(a.state) - STATE_ORDER.indexOf(b.state) || (a.site < b.site ? -1 : 1));
    const fragment = document.createDocumentFragment();
    for (const s of rows.slice(0, 1000)) {
      const tr = document.createElement("tr");
      cell(tr, s.site, "name");
      cell(tr, s.state, "state " + s.state.replace(/[^a-z]/g, ""));
      cell(tr, s.round === null ? "–" : String(s.round), "num");
      cell(tr, clock(s.joined));
      cell(tr, ago(s.last_seen));
      cell(tr, String(s.rounds), "num");
      cell(tr, String(s.refused), "num");
      cell(tr, String(s.dropped), "num");
      cell(tr, s.detail, "detail");
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
  }

  function drawEvents() {
    const body = $("events").tBodies[0];
    const fragment = document.createDocumentFragment();
    for (const e of state.events.slice().reverse()) {
      const tr = document.createElement("tr");
      cell(tr, clock(e.time));
      cell(tr, e.round === null ? "–" : String(e.round), "num");
      cell(tr, e.kind, "kind " + e.kind.replace(/[^a-z_]/g, ""));
      cell(tr, e.message, "detail");
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
  }

  function drawRounds() {
    const body = $("rounds").tBodies[0];
    const fragment = document.createDocumentFragment();
    const rounds = [...state.rounds.keys()].sort((a, b) => b - a).slice(0, 500);
    for (const r of rounds) {
      const row = state.rounds.get(r);
      const e = state.evaluations.get(r) || {};
      const tr = document.createElement("tr");
      cell(tr, String(r), "num");
      cell(tr, String(row.sites), "num");
      cell(tr, num(row.train_loss), "num");
      cell(tr, num(e.loss), "num");
      cell(tr, num(e.accuracy), "num");
      cell(tr, num(e.perplexity, 2), "num");
      cell(tr, bytes(row.bytes_sent + row.bytes_received), "num");
      cell(tr, num(row.seconds, 2), "num");
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
  }

  function drawSamples() {
    const box = $("samples");
    if (!state.samples.length) return;
    const fragment = document.createDocumentFragment();
    for (const s of state.samples.slice().reverse()) {
      const div = document.createElement("div");
      div.className = "sample";
      const head = document.createElement("div");
      head.className = "muted";
      head.textContent = "after round " + s.round;
      const pre = document.createElement("pre");
      const prompt = document.createElement("b");
      prompt.textContent = s.prompt;
      pre.appendChild(prompt);
      pre.appendChild(document.createTextNode(s.text));
      div.appendChild(head);
      div.appendChild(pre);
      fragment.appendChild(div);
    }
    box.replaceChildren(fragment);
  }

  function drawSettings() {
    const dl = $("settings");
    const fragment = document.createDocumentFragment();
    for (const [k, v] of Object.entries(state.config)) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = String(v);
      fragment.appendChild(dt);
      fragment.appendChild(dd);
    }
    dl.replaceChildren(fragment);
  }

  function draw() {
    drawCards();
    drawPlots();
    drawSites();
    drawEvents();
    drawRounds();
    drawSamples();
    drawSettings();
  }

  // -- the stream ------------------------------------------------------------------------------------
  function connect() {
    const source = new EventSource("api/stream");
    source.addEventListener("update", (event) => {
      $("connection").textContent = "live";
      $("connection").className = "live";
      take(JSON.parse(event.data));
    });
    source.onerror = () => {
      // The browser reconnects by itself (and then receives everything again).
      $("connection").textContent = "reconnecting…";
      $("connection").className = "muted";
    };
  }
  window.setInterval(() => {
    $("updated").textContent = state.lastUpdate ? "updated " + ago(state.lastUpdate / 1000) : "";
    if (state.sites.size) drawSites();
  }, 5000);
  window.addEventListener("load", () => {
    // Redraw when a plot's box changes width (the window, or the grid settling as the page fills).
    const widths = new Map();
    const observer = new ResizeObserver((entries) => {
      for (const entry of entries) {
        const width = Math.round(entry.contentRect.width);
        if (widths.get(entry.target) !== width) { widths.set(entry.target, width); schedule(); }
      }
    });
    for (const div of document.querySelectorAll(".plot")) observer.observe(div);
    schedule();
    connect();
  });
})();
