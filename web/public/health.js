// Admin dashboard: host health polled every 5 s, coloured bars (green
// < 70 %, yellow 70–90 %, red > 90 %), a warning banner above 90 % CPU or
// memory, loading and error states, 24 h history charts, and alert states.

import { api } from "/api.js";
import { el, errorBox } from "/dom.js";
import uPlot from "/vendor/uPlot.esm.js";

const POLL_MS = 5000;
const HISTORY_MS = 30000;

export function level(percent) {
  if (percent > 90) return "crit";
  if (percent >= 70) return "warn";
  return "ok";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function duration(secs) {
  const d = Math.floor(secs / 86400);
  const h = Math.floor((secs % 86400) / 3600);
  const m = Math.floor((secs % 3600) / 60);
  return d > 0 ? `${d}d ${h}h` : `${h}h ${m}m`;
}

// A labelled usage bar; `data-level` carries the colour class for tests.
function bar(id, label, percent, detail) {
  const lvl = level(percent);
  const fill = el("div", { class: `fill level-${lvl}` });
  fill.style.width = `${Math.min(100, Math.max(0, percent))}%`;
  return el("div", { class: "meter", id, "data-level": lvl },
    el("div", { class: "meter-head" }, el("span", {}, label), el("strong", {}, `${percent.toFixed(1)} %`)),
    el("div", { class: "track", role: "progressbar", "aria-valuenow": percent.toFixed(1), "aria-valuemin": "0", "aria-valuemax": "100" }, fill),
    detail ? el("div", { class: "muted small" }, detail) : null);
}

function renderSystem(h) {
  const warnings = [];
  if (h.cpu.usage > 90) warnings.push(`CPU at ${h.cpu.usage.toFixed(1)} %`);
  if (h.memory.percent > 90) warnings.push(`memory at ${h.memory.percent.toFixed(1)} %`);
  return [
    warnings.length
      ? el("div", { class: "banner", id: "health-warning", role: "alert" }, `High usage: ${warnings.join(", ")}.`)
      : null,
    el("div", { class: "cards" },
      el("section", { class: "card" }, el("h2", {}, "CPU"),
        bar("cpu-bar", `${h.cpu.cores} cores`, h.cpu.usage, h.cpu.model),
        el("div", { class: "muted small", id: "load" }, `load ${h.load_average.map((l) => l.toFixed(2)).join(" / ")}`)),
      el("section", { class: "card" }, el("h2", {}, "Memory"),
        bar("memory-bar", `${bytes(h.memory.used)} of ${bytes(h.memory.total)}`, h.memory.percent, `${bytes(h.memory.free)} free`)),
      el("section", { class: "card" }, el("h2", {}, "Disks"),
        h.disk.map((d, i) => bar(`disk-bar-${i}`, d.mount, d.percent, `${bytes(d.used)} of ${bytes(d.size)} on ${d.filesystem}`))),
      el("section", { class: "card" }, el("h2", {}, "Host"),
        el("p", {}, `Up ${duration(h.uptime)}`),
        h.temperature
          ? el("p", { id: "temperature" }, `Temperature ${h.temperature.current.toFixed(1)} °C`)
          : el("p", { class: "muted", id: "temperature" }, "No temperature sensor"),
        el("p", {}, `Network ${h.network.status}`))),
    el("section", { class: "card" }, el("h2", {}, "Interfaces"),
      el("table", { class: "grid" },
        el("thead", {}, el("tr", {}, el("th", {}, "Name"), el("th", {}, "Status"), el("th", {}, "Received"), el("th", {}, "Sent"))),
        el("tbody", {}, h.network.interfaces.map((i) =>
          el("tr", {}, el("td", {}, i.name), el("td", {}, i.status), el("td", {}, bytes(i.rx_bytes)), el("td", {}, bytes(i.tx_bytes))))))),
  ];
}

function renderAlerts(list) {
  return el("section", { class: "card", id: "alerts" }, el("h2", {}, "Alerts"),
    el("table", { class: "grid" },
      el("thead", {}, el("tr", {}, el("th", {}, "Rule"), el("th", {}, "State"), el("th", {}, "Value"), el("th", {}, "Threshold"))),
      el("tbody", {}, list.alerts.map((a) =>
        el("tr", { "data-state": a.state },
          el("td", {}, a.rule),
          el("td", {}, el("span", { class: `pill state-${a.state}` }, a.state)),
          el("td", {}, String(a.value)),
          el("td", {}, `> ${a.above}${a.forSecs ? ` for ${a.forSecs} s` : ""}`))))));
}

const CHARTS = [
  { metric: "cpu", title: "CPU %", series: [["usage_percent", "CPU %", "#2f5bd3"]], max: 100 },
  { metric: "memory", title: "Memory %", series: [["percent", "Memory %", "#8a4fd3"]], max: 100 },
  { metric: "disk", title: "Fullest disk %", series: [["percent", "Disk %", "#c27c0e"]], max: 100 },
  { metric: "network", title: "Network bytes/s", series: [["rx_bytes_per_sec", "received", "#1f8a4c"], ["tx_bytes_per_sec", "sent", "#b42318"]] },
];

function chart(target, spec, history, width) {
  const xs = history.timestamps.map((t) => t / 1000);
  const data = [xs, ...spec.series.map(([key]) => history.series[key] || [])];
  const opts = {
    width,
    height: 180,
    series: [{}, ...spec.series.map(([, label, stroke]) => ({ label, stroke, width: 1.5 }))],
    scales: spec.max ? { y: { range: [0, spec.max] } } : {},
    axes: [{}, { size: 60 }],
  };
  target.replaceChildren();
  return new uPlot(opts, data, target);
}

export function renderHealth(view) {
  let stopped = false;
  let range = "1h";
  const status = el("div", { id: "health-status" }, el("p", { class: "muted", id: "health-loading" }, "Loading host health…"));
  const system = el("div", { id: "health-system" });
  const alerts = el("div");
  const charts = CHARTS.map((spec) => ({ spec, box: el("div", { class: "chart", id: `chart-${spec.metric}` }), plot: null }));
  const rangeButtons = ["1h", "6h", "24h"].map((r) =>
    el("button", { class: r === range ? "tab active" : "tab", "data-range": r, onclick: () => { range = r; refreshHistory(); } }, r));
  view.replaceChildren(
    el("h1", {}, "Host health"), status, system, alerts,
    el("section", { class: "card" },
      el("div", { class: "chart-head" }, el("h2", {}, "History"), el("div", { class: "tabs" }, rangeButtons)),
      el("div", { class: "charts" }, charts.map((c) => el("div", {}, el("h3", {}, c.spec.title), c.box)))));

  async function refresh() {
    try {
      const [health, alertList] = await Promise.all([api.hostHealth(), api.alerts()]);
      if (stopped) return;
      system.replaceChildren(...renderSystem(health).filter(Boolean));
      alerts.replaceChildren(renderAlerts(alertList));
      status.replaceChildren(el("p", { class: "muted small", id: "health-updated" }, `Updated ${new Date(health.timestamp).toLocaleTimeString()}`));
    } catch (e) {
      if (stopped) return;
      // Keep the last reading visible but say clearly that it is stale.
      status.replaceChildren(errorBox(`Cannot load host health: ${e.message}. Retrying every ${POLL_MS / 1000} s.`));
      status.firstChild.id = "health-error";
    }
  }

  async function refreshHistory() {
    rangeButtons.forEach((b) => b.classList.toggle("active", b.dataset.range === range));
    for (const c of charts) {
      try {
        const history = await api.hostHistory(c.spec.metric, range);
        if (stopped) return;
        const width = Math.max(280, c.box.clientWidth || 420);
        c.plot?.destroy();
        c.plot = chart(c.box, c.spec, history, width);
        if (history.timestamps.length === 0) {
          c.box.append(el("p", { class: "muted small" }, "Collecting: a point every 10 s."));
        }
      } catch (e) {
        if (stopped) return;
        c.box.replaceChildren(errorBox(`History unavailable: ${e.message}`));
      }
    }
  }

  refresh();
  refreshHistory();
  const poll = setInterval(refresh, POLL_MS);
  const pollHistory = setInterval(refreshHistory, HISTORY_MS);
  return () => {
    stopped = true;
    clearInterval(poll);
    clearInterval(pollHistory);
    charts.forEach((c) => c.plot?.destroy());
  };
}
