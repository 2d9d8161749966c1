// The admin's Sandboxes page: what sandboxes are made from (each
// template's image, and how far a preparation of it is, or why it failed),
// the warm pools, and the live sandboxes with a way to end one. It
// refreshes itself every few seconds while it is open.

import { api } from "/api.js";
import { el, errorBox } from "/dom.js";

const REFRESH_MS = 3000;

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function imageState(s) {
  switch (s.state) {
    case "ready": return "ready";
    case "missing": return "missing: `polydev image build` or a restart prepares it";
    case "queued": return "queued (after the template before it)";
    case "building": return s.of ? `building: step ${s.step} of ${s.of}, ${s.what} (started ${ago(s.sinceMs)})` : `building: ${s.what}`;
    case "failed": return `failed ${ago(s.atMs)}: ${s.error}`;
    default: return String(s.state);
  }
}

function imagesTable(images) {
  return el("table", { class: "grid", id: "images" },
    el("thead", {}, el("tr", {}, el("th", {}, "Template"), el("th", {}, "State"), el("th", {}, "Image"))),
    el("tbody", {}, images.map((i) => el("tr", { "data-template": i.template, "data-state": i.status.state },
      el("td", {}, i.template),
      el("td", { class: i.status.state === "failed" ? "error-text" : null }, imageState(i.status)),
      el("td", { class: "mono" }, i.image ? `${i.image.slice(0, 12)}${i.validated ? "" : " (not validated)"}` : "—")))));
}

function poolsPart(pools) {
  if (!pools.length) return el("p", { class: "muted", id: "pools" }, "No warm pools: every sandbox boots when asked for ([sandbox] pools in the config).");
  return el("table", { class: "grid", id: "pools" },
    el("thead", {}, el("tr", {}, el("th", {}, "Template"), el("th", {}, "Ready"), el("th", {}, "Target"))),
    el("tbody", {}, pools.map((p) => el("tr", {}, el("td", {}, p.template), el("td", {}, p.ready), el("td", {}, p.target)))));
}

function sandboxesPart(list, onEnd) {
  const live = list.filter((s) => !["ended", "failed", "lost"].includes(s.status));
  if (!live.length) return el("p", { class: "muted", id: "live" }, "No live sandboxes.");
  return el("table", { class: "grid", id: "live" },
    el("thead", {}, el("tr", {}, el("th", {}, "Sandbox"), el("th", {}, "Template"), el("th", {}, "State"),
      el("th", {}, "Started"), el("th", {}, "Kind"), el("th", {}, ""))),
    el("tbody", {}, live.map((s) => el("tr", { "data-id": s.id },
      el("td", { class: "mono" }, s.id.slice(0, 12)),
      el("td", {}, s.template),
      el("td", {}, s.status),
      el("td", {}, ago(s.createdAtMs)),
      el("td", {}, (s.labels && s.labels.system) ? `${s.labels.system}` : "user"),
      el("td", {}, el("button", { type: "button", class: "secondary small", "data-end": s.id, onclick: () => onEnd(s.id) }, "End"))))));
}

export function renderSandboxes(view) {
  const status = el("div", { id: "sandboxes-status" });
  const body = el("div", {}, el("p", { class: "muted" }, "Loading…"));
  view.replaceChildren(el("h1", {}, "Sandboxes"), status, body);
  let timer = null;
  let stopped = false;
  const end = async (id) => {
    status.replaceChildren();
    try {
      await api.deleteSandbox(id);
      await load();
    } catch (e) {
      status.replaceChildren(errorBox(e.message));
    }
  };
  const load = async () => {
    try {
      const [env, list] = await Promise.all([api.environment(), api.sandboxes()]);
      if (stopped) return;
      body.replaceChildren(
        el("section", { class: "card" },
          el("h2", {}, "Images"),
          el("p", { class: "muted" }, `Driver ${env.driver}. Each template's current image, and what a preparation is doing.`),
          imagesTable(env.images)),
        el("section", { class: "card" }, el("h2", {}, "Warm pools"), poolsPart(env.pools)),
        el("section", { class: "card" },
          el("h2", {}, "Live sandboxes"),
          el("p", { class: "muted", id: "capacity" }, `${env.live} of at most ${env.hostMax} on this host.`),
          sandboxesPart(list.sandboxes, end)));
    } catch (e) {
      if (!stopped) body.replaceChildren(errorBox(`Cannot read the sandbox environment: ${e.message}`));
    }
  };
  const tick = async () => {
    await load();
    if (!stopped) timer = setTimeout(tick, REFRESH_MS);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
