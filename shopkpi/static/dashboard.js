// The shopkpi dashboard: reads the JSON API (/api/summary, /api/category, /api/health), draws it with Chart.js,
// and polls every 10 s. No framework and no build step; the server does the arithmetic on exact integers, the page
// only formats and draws. docs/dashboard.md describes the panels.
"use strict";

(() => {
  const POLL_MS = 10000;
  const COLORS = ["#3b6ea5", "#e07b39", "#4d9a5b", "#b84a62", "#7d5ba6", "#c9a227", "#3a9ca6", "#8c6d4f",
    "#d46aa6", "#6b7b8c"];
  const SELECTED = "#e07b39";
  const BAR = "#3b6ea5";
  const $ = (id) => document.getElementById(id);

  // What is shown: the range (a preset of days that follows the newest date, all, or fixed dates) and the day.
  const state = { days: 30, from: null, to: null, date: null, summary: null, dayRows: [], texts: {}, charts: {} };

  // --- numbers --------------------------------------------------------------------------------------------------
  // Money and rates arrive as exact decimals (10000000000000050.05); JSON.parse's reviver sees each number's source
  // text, and keeps a decimal's as a string so the page shows what the server sent, digit for digit.
  function parseExact(text) {
    return JSON.parse(text, (key, value, context) =>
      typeof value === "number" && context && /[.eE]/.test(context.source || "") ? context.source : value);
  }
  const num = (v) => (v === null || v === undefined ? null : Number(v));
  const group = (digits) => digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");

  function decimal(v) {
    if (v === null || v === undefined) return "–";
    let text = typeof v === "string" ? v : Number(v).toFixed(2);
    const sign = text.startsWith("-") ? "-" : "";
    text = text.replace(/^[-+]/, "");
    const [whole, fraction] = text.split(".");
    return sign + group(whole) + (fraction === undefined ? "" : "." + fraction);
  }

  let currency = "USD";
  function symbol() {
    const parts = new Intl.NumberFormat("en-US", { style: "currency", currency }).formatToParts(0);
    return (parts.find((p) => p.type === "currency") || { value: currency + " " }).value;
  }
  const FORMATS = {
    money: (v) => (v === null || v === undefined ? "–" : symbol() + decimal(v)),
    count: (v) => (v === null || v === undefined ? "–" : group(String(v))),
    percent: (v) => (v === null || v === undefined ? "–" : decimal(v) + " %"),
    decimal,
    number: (v) => String(v),
    text: (v) => (v === null || v === undefined ? "" : String(v)),
  };
  const shortMoney = (v) => symbol() + new Intl.NumberFormat("en-US", { notation: "compact" }).format(v);

  // --- the server -----------------------------------------------------------------------------------------------
  async function read(url) {
    const response = await fetch(url, { cache: "no-store" });
    const text = await response.text();
    if (!response.ok) {
      let message = text;
      try { message = JSON.parse(text).message; } catch (e) { /* not JSON: the text is the message */ }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return { text, data: parseExact(text) };
  }

  function rangeQuery() {
    const q = new URLSearchParams();
    if (state.from) q.set("from", state.from);
    if (state.to) q.set("to", state.to);
    if (!state.from && state.days) q.set("days", String(state.days));
    return q;
  }

  // The address bar holds the view, so a link or a reload opens the same range and day.
  function remember() {
    const q = rangeQuery();
    if (state.date) q.set("date", state.date);
    history.replaceState(null, "", "/?" + q.toString());
  }

  function restore() {
    const q = new URLSearchParams(location.search);
    state.from = q.get("from");
    state.to = q.get("to");
    state.days = q.has("days") || !(state.from || state.to) ? Number(q.get("days") || 30) : null;
    state.date = q.get("date");
  }

  // --- cards ----------------------------------------------------------------------------------------------------
  function renderCards(s) {
    const range = s.range;
    $("range-label").textContent = `${range.from} – ${range.to} (${range.days} days)`;
    $("previous-label").textContent = `vs ${s.previous.from} – ${s.previous.to}`;
    for (const card of document.querySelectorAll(".card")) {
      const key = card.dataset.kpi;
      card.querySelector(".value").textContent = FORMATS[card.dataset.format](s.totals[key]);
      const delta = s.change[key];
      const change = card.querySelector(".change");
      change.classList.remove("up", "down", "good", "bad");
      if (delta === null || delta === undefined) {
        change.textContent = "no previous data";
        continue;
      }
      const n = Number(delta);
      const unit = key === "return_rate" ? " pp" : " %";
      change.textContent = `${n > 0 ? "▲ +" : n < 0 ? "▼ " : "● "}${decimal(delta)}${unit} vs previous period`;
      if (n !== 0) {
        const better = (n > 0) !== Boolean(card.dataset.lowerIsBetter);
        change.classList.add(n > 0 ? "up" : "down", better ? "good" : "bad");
      }
    }
  }

  // --- charts ---------------------------------------------------------------------------------------------------
  function axis(title, format) {
    return { title: { display: true, text: title }, beginAtZero: true, ticks: format ? { callback: format } : {} };
  }

  // A chart is made once and then fed new data; ``pickDay``: a click on a day picks it for the breakdown.
  function chart(id, type, options, pickDay = false) {
    if (!state.charts[id]) {
      state.charts[id] = new Chart($(id), {
        type,
        data: { labels: [], datasets: [] },
        options: {
          animation: false,
          maintainAspectRatio: false,
          interaction: { mode: "index", intersect: false },
          onClick: (event, elements, c) => pickDay && elements.length && selectDay(c.data.labels[elements[0].index]),
          ...options,
        },
      });
    }
    return state.charts[id];
  }

  function pointStyle(dates, base) {
    return { pointRadius: dates.map((d) => (d === state.date ? 6 : 2)),
      pointBackgroundColor: dates.map((d) => (d === state.date ? SELECTED : base)) };
  }

  function tooltip(format) {
    return { callbacks: { label: (item) => `${item.dataset.label}: ${format(item.raw)}` } };
  }

  function renderDaily(s) {
    const days = s.daily;
    const dates = days.map((d) => d.order_date);
    const money = FORMATS.money;
    const revenue = chart("chart-revenue", "bar", {
      scales: { x: { title: { display: true, text: "order date (UTC)" } },
        y: axis(`revenue (${currency})`, shortMoney) },
      plugins: { tooltip: tooltip(money) },
    }, true);
    revenue.data.labels = dates;
    revenue.data.datasets = [
      { label: `revenue ${s.range.from} – ${s.range.to}`, data: days.map((d) => num(d.total_revenue)),
        backgroundColor: dates.map((d) => (d === state.date ? SELECTED : BAR)) },
      { type: "line", label: `previous period ${s.previous.from} – ${s.previous.to}`,
        data: s.previous_daily.map((d) => num(d.total_revenue)), borderColor: "#999", borderDash: [6, 4],
        pointRadius: 0, spanGaps: false },
    ];
    revenue.update();

    const counts = chart("chart-counts", "line", {
      scales: { x: { title: { display: true, text: "order date (UTC)" } }, y: axis("per day (count)") },
      plugins: { tooltip: tooltip(FORMATS.count) },
    }, true);
    counts.data.labels = dates;
    counts.data.datasets = [["orders", "total_orders"], ["items sold", "total_items_sold"],
      ["unique customers", "unique_customers"]].map(([label, key], i) => ({
      label, data: days.map((d) => d[key]), borderColor: COLORS[i], backgroundColor: COLORS[i],
      ...pointStyle(dates, COLORS[i]),
    }));
    counts.update();

    const returns = chart("chart-returns", "line", {
      scales: { x: { title: { display: true, text: "order date (UTC)" } },
        y: axis("return rate (% of orders)", (v) => `${v} %`) },
      plugins: { tooltip: tooltip(FORMATS.percent) },
    }, true);
    returns.data.labels = dates;
    returns.data.datasets = [{ label: "return rate", data: days.map((d) => num(d.return_rate)),
      borderColor: COLORS[3], backgroundColor: COLORS[3], ...pointStyle(dates, COLORS[3]) }];
    returns.update();
  }

  function renderRanking(id, rows, key, title, format) {
    const sorted = [...rows].sort((a, b) => Number(b[key]) - Number(a[key]) || a.category.localeCompare(b.category));
    const c = chart(id, "bar", {
      indexAxis: "y",
      interaction: { mode: "nearest", axis: "y", intersect: false },
      scales: { x: axis(title, format === FORMATS.money ? shortMoney : (v) => `${v} %`),
        y: { ticks: { autoSkip: false } } },
      plugins: { legend: { display: false }, tooltip: tooltip(format) },
    });
    c.data.labels = sorted.map((r) => r.category);
    c.data.datasets = [{ label: title, data: sorted.map((r) => num(r[key])), backgroundColor: BAR }];
    // Every category gets a readable row, however many there are.
    c.canvas.parentNode.style.height = `${Math.max(220, 22 * sorted.length + 60)}px`;
    c.resize();
    c.update();
  }

  function renderTrend(s) {
    const metric = $("trend-metric").value;
    const top = Number($("trend-top").value) || s.categories.length;
    const names = s.categories.slice(0, top).map((r) => r.category);
    const percent = metric === "return_rate";
    const c = chart("chart-trend", "line", {
      scales: { x: { title: { display: true, text: "order date (UTC)" } } },
    }, true);
    // the metric can change between two draws: the axis and tooltips follow it
    c.options.scales.y = percent ? axis("return rate (% of orders)", (v) => `${v} %`)
      : axis(`revenue (${currency})`, shortMoney);
    c.options.plugins.tooltip = tooltip(percent ? FORMATS.percent : FORMATS.money);
    c.data.labels = s.category_trend.dates;
    c.data.datasets = names.map((name, i) => ({
      label: name, data: s.category_trend.series[name][metric].map(num),
      borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length], pointRadius: 2,
      spanGaps: percent, // a day a category sold nothing has no return rate: join its neighbours
    }));
    c.update();
  }

  // --- tables ---------------------------------------------------------------------------------------------------
  // A sortable table keeps its sort across refreshes: the header's aria-sort says which column and direction.
  const tableRows = new Map();
  function fillTable(id, rows) {
    const table = $(id);
    tableRows.set(id, rows);
    const headers = [...table.querySelectorAll("th")];
    const sorted = headers.find((th) => th.hasAttribute("aria-sort"));
    let view = rows;
    if (sorted) {
      const key = sorted.dataset.key;
      const numeric = Boolean(sorted.dataset.type);
      const sign = sorted.getAttribute("aria-sort") === "descending" ? -1 : 1;
      view = [...rows].sort((a, b) => sign * (numeric ? Number(a[key] ?? -Infinity) - Number(b[key] ?? -Infinity)
        : String(a[key]).localeCompare(String(b[key]))));
    }
    const body = table.tBodies[0];
    body.replaceChildren(...view.map((row) => {
      const tr = document.createElement("tr");
      for (const th of headers) {
        const td = document.createElement("td");
        td.textContent = FORMATS[th.dataset.type || "text"](row[th.dataset.key]);
        td.dataset.key = th.dataset.key;
        tr.append(td);
      }
      return tr;
    }));
  }

  function sortable(table) {
    for (const th of table.querySelectorAll("th")) {
      th.tabIndex = 0;
      const sort = () => {
        const descending = th.getAttribute("aria-sort") === "ascending";
        for (const other of table.querySelectorAll("th")) other.removeAttribute("aria-sort");
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        fillTable(table.id, tableRows.get(table.id) || []);
        if (table.id === "table-daily") markDay();
      };
      th.addEventListener("click", sort);
      th.addEventListener("keydown", (e) => (e.key === "Enter" || e.key === " ") && (e.preventDefault(), sort()));
    }
  }

  function markDay() {
    for (const tr of $("table-daily").tBodies[0].rows) {
      tr.classList.toggle("selected", tr.cells[0].textContent === state.date);
    }
  }

  // --- health ---------------------------------------------------------------------------------------------------
  const when = (iso) => (iso ? iso.replace("T", " ").replace(/(\.\d+)?(Z|[+-]00:00)$/, "") : "–");
  const counts = (map) => Object.entries(map || {}).map(([k, v]) => `${k} ${group(String(v))}`).join(", ") || "none";
  const any = (map) => Object.values(map || {}).some((n) => n > 0);

  function renderHealth(h) {
    // [term, value, alarm]: an alarm is shown in red (something an operator must look at)
    const facts = [
      ["KPIs last merged", when(h.last_merge) + (h.last_merge_published === null ? ""
        : ` (${h.last_merge_published} items written or removed)`), false],
      ["last file outcome", when(h.last_file), false],
      ["events queued", String(h.queued_events), false],
      ["dead letters", counts(h.dead_letters), any(h.dead_letters)],
      ["rows waiting", counts(h.waiting), false],
      ["orphaned (past grace)", counts(h.orphans), any(h.orphans)],
      ["rejected at merge", counts(h.late_rejects), false],
    ];
    $("health-facts").replaceChildren(...facts.flatMap(([term, value, alarm]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = term;
      dd.textContent = value;
      dd.classList.toggle("bad", alarm);
      return [dt, dd];
    }));
    rows("table-executions", h.executions, (e) => [e.name, e.status, when(e.started_at),
      e.seconds === null ? "running" : `${e.seconds} s`], (e) => `status-${e.status.toLowerCase()}`);
    rows("table-files", h.files, (f) => [f.file, f.outcome, [f.reason, f.message].filter(Boolean).join(": "),
      `${f.rejected_rows ?? "–"} of ${f.rows ?? "–"}` + (Object.keys(f.rejects_by_reason).length
        ? ` (${counts(f.rejects_by_reason)})` : ""), when(f.updated_at)], (f) => `outcome-${f.outcome}`);
  }

  function rows(id, items, cells, rowClass) {
    $(id).tBodies[0].replaceChildren(...items.map((item) => {
      const tr = document.createElement("tr");
      tr.className = rowClass(item);
      for (const text of cells(item)) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    }));
  }

  // --- the view -------------------------------------------------------------------------------------------------
  function renderSummary(s) {
    currency = s.currency || currency;
    const empty = !s.range;
    $("empty").hidden = !empty;
    if (empty) return;
    const first = s.stored.first || s.range.from;
    for (const input of [$("from"), $("to"), $("day")]) {
      input.min = first < s.range.from ? first : s.range.from;
      input.max = s.stored.last > s.range.to ? s.stored.last : s.range.to;
    }
    $("from").value = s.range.from;
    $("to").value = s.range.to;
    for (const b of document.querySelectorAll(".presets button")) {
      b.classList.toggle("active", !state.from ? b.dataset.days === String(state.days)
        : b.dataset.days === "all" && state.from === s.stored.first && !state.to);
    }
    if (!state.date || state.date < s.range.from || state.date > s.range.to) {
      const withOrders = s.daily.filter((d) => d.total_orders);
      state.date = withOrders.length ? withOrders[withOrders.length - 1].order_date : s.range.to;
    }
    renderCards(s);
    renderDaily(s);
    renderRanking("chart-rank-revenue", s.categories, "revenue", `revenue (${currency})`, FORMATS.money);
    renderRanking("chart-rank-returns", s.categories, "return_rate", "return rate (% of orders)", FORMATS.percent);
    renderTrend(s);
    fillTable("table-ranking", s.categories);
    fillTable("table-daily", s.daily.filter((d) => d.total_orders !== null));
    markDay();
    const q = rangeQuery();
    $("csv-daily").href = `/api/daily.csv?from=${s.range.from}&to=${s.range.to}`;
    $("csv-categories").href = `/api/categories.csv?${q}`;
  }

  function renderDay() {
    $("day").value = state.date || "";
    fillTable("table-day", state.dayRows);
    $("csv-day").href = `/api/category.csv?date=${state.date || ""}`;
  }

  // One refresh: read everything, redraw only what changed (a poll that finds nothing new costs no redraw). A
  // refresh started later (a new range while a poll is on the wire) supersedes this one: its answers are dropped.
  async function refresh() {
    const seq = (state.seq = (state.seq || 0) + 1);
    const current = () => seq === state.seq;
    remember();
    try {
      const summary = await read(`/api/summary?${rangeQuery()}`);
      if (!current()) return;
      const changed = summary.text !== state.texts.summary;
      if (changed) {
        state.texts.summary = summary.text;
        state.summary = summary.data;
        renderSummary(summary.data);
        remember(); // the day may have moved into the new range
      }
      const day = state.date ? await read(`/api/category?date=${state.date}`) : { text: "[]", data: [] };
      if (!current()) return;
      if (changed || day.text !== state.texts.day) {
        state.texts.day = day.text;
        state.dayRows = day.data;
        renderDay();
      }
      await refreshHealth(current);
      if (!current()) return;
      $("error").hidden = true;
      const now = new Date().toLocaleTimeString("en-GB");
      if (changed) state.changedAt = now;
      $("status").textContent = `read ${now} · figures changed ${state.changedAt}`;
      document.body.dataset.state = "ready";
    } catch (error) {
      if (!current()) return;
      $("error").textContent = `Could not read the KPIs: ${error.message}`;
      $("error").hidden = false;
      $("status").textContent = "read failed; retrying";
    }
  }

  // A dashboard started without a stack to watch answers 404 once; the page then stops asking.
  async function refreshHealth(current) {
    if (state.noHealth) return;
    try {
      const health = await read("/api/health");
      if (current() && health.text !== state.texts.health) {
        state.texts.health = health.text;
        renderHealth(health.data);
      }
      $("health-unavailable").hidden = true;
    } catch (error) {
      if (error.status !== 404) throw error;
      state.noHealth = true;
      $("health-unavailable").hidden = false;
    }
  }

  function selectDay(day) {
    if (!day || day === state.date) return;
    state.date = day;
    state.texts.summary = null; // redraw the marks
    refresh();
  }

  function setRange(from, to, days) {
    Object.assign(state, { from, to, days });
    state.texts.summary = null;
    refresh();
  }

  function wire() {
    for (const table of document.querySelectorAll("table.sortable")) sortable(table);
    $("range").addEventListener("submit", (e) => {
      e.preventDefault();
      if ($("from").value > $("to").value) {
        $("error").textContent = "From is after To: pick the earlier date first.";
        $("error").hidden = false;
        return;
      }
      setRange($("from").value, $("to").value, null);
    });
    for (const b of document.querySelectorAll(".presets button")) {
      b.addEventListener("click", () => (b.dataset.days === "all"
        ? setRange(state.summary && state.summary.stored ? state.summary.stored.first : null, null, null)
        : setRange(null, null, Number(b.dataset.days))));
    }
    $("day").addEventListener("change", () => selectDay($("day").value));
    for (const id of ["trend-metric", "trend-top"]) {
      $(id).addEventListener("change", () => state.summary && state.summary.range && renderTrend(state.summary));
    }
    $("refresh").addEventListener("click", refresh);
    let timer = setInterval(refresh, POLL_MS);
    $("auto").addEventListener("change", () => {
      clearInterval(timer);
      if ($("auto").checked) timer = setInterval(refresh, POLL_MS);
    });
  }

  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  restore();
  wire();
  refresh();
})();
