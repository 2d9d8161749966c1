// polydev web UI: a small client-side router over plain DOM. Later pages
// (vault unlock, providers, runs, login viewer, admin dashboard) register
// themselves in `routes` and in the nav.

import { api, ApiError } from "/api.js";
import { el, errorBox } from "/dom.js";
import * as session from "/session.js";

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const who = document.getElementById("who");

let currentUser = null;
// A page may return a function that stops its timers; called on navigation.
let cleanup = null;

function show(...nodes) {
  view.replaceChildren(...nodes);
}

export function go(path) {
  if (location.pathname !== path) history.pushState({}, "", path);
  render();
}

// A sign-up or log-in form; `submit` gets the values and returns a promise.
function credentialsForm({ title, button, note, acknowledge, submit, alternative }) {
  const email = el("input", { type: "email", name: "email", id: "email", autocomplete: "username", required: true });
  const password = el("input", {
    type: "password", name: "password", id: "password", minlength: "8", required: true,
    autocomplete: button === "Sign up" ? "new-password" : "current-password",
  });
  const status = el("div", { class: "status" });
  const ack = acknowledge ? el("input", { type: "checkbox", id: "acknowledge" }) : null;
  const submitButton = el("button", { type: "submit" }, button);
  const form = el("form", { class: "card", novalidate: true },
    el("h1", {}, title),
    el("label", { for: "email" }, "Email"), email,
    el("label", { for: "password" }, "Password"), password,
    note ? el("p", { class: "muted small" }, note) : null,
    acknowledge ? el("p", { class: "warning-note" }, el("label", { for: "acknowledge", class: "check" }, ack, " ", acknowledge)) : null,
    submitButton, status, alternative);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submitButton.disabled = true;
    status.replaceChildren();
    try {
      await submit(email.value, password.value, ack ? ack.checked : true);
    } catch (e) {
      status.replaceChildren(errorBox(e.message));
    } finally {
      submitButton.disabled = false;
    }
  });
  return form;
}

async function logInAndGoHome(email, password) {
  currentUser = await session.logIn(email, password);
  go("/");
}

/// The way to a first answer, as far as you have come: your vault (done
/// once you are here), a CLI connected (with the way this installation
/// recommends: a code where a CLI's sign-in offers one to you, else an API
/// key), a first run. Filled in from the server's provider registry, your
/// vault's item names and your runs.
function firstSteps() {
  const step = (id, done, ...text) =>
    el("li", { id, "data-done": String(done), class: done ? "done" : null }, done ? "✓ " : "", ...text);
  const list = el("ol", { id: "first-steps", class: "steps" }, el("li", { class: "muted" }, "Checking where you are…"));
  const card = el("section", { class: "card", id: "get-started" }, el("h2", {}, "Get started"), list);
  // Runs may be off on this server (no sandboxes): said in their step.
  const runsOrWhy = api.runs().then((r) => r.runs || [], (e) => ({ unavailable: e.message }));
  Promise.all([api.providers(), api.vaultItems().then((r) => r.items), runsOrWhy])
    .then(([providers, items, runs]) => {
      const connected = providers.filter((p) => ["apikey", "credential", "token", "cloud"].some((k) => items.some((i) => i.id === `${k}.${p.id}`)));
      const byCode = providers.find((p) => (p.signInModes || []).includes("code"));
      const how = byCode
        ? [`${byCode.name} signs in with a code here (your own ${byCode.name} plan); the others take an API key.`]
        : [`Save an API key, e.g. ${providers[0] ? `${providers[0].keyLabel} for ${providers[0].name}` : "a provider's"}.`];
      list.replaceChildren(
        step("step-vault", true, "Your account and your vault: the key to your vault stays in this tab."),
        step("step-connect", connected.length > 0,
          connected.length > 0 ? `${connected.length} of ${providers.length} CLIs connected. ` : "Connect a CLI. ", ...how, " ",
          el("a", { href: "/providers", "data-link": true }, "Providers")),
        runs.unavailable
          ? step("step-run", false, `Runs are not available on this server yet: ${runs.unavailable}`)
          : step("step-run", runs.length > 0, runs.length > 0 ? "You have asked your first question. " : "Ask your first question across the CLIs you connected: ",
            el("a", { href: "/runs", "data-link": true }, runs.length > 0 ? "Runs" : "start a run")));
      if (connected.length > 0 && runs.length > 0) card.classList.add("all-done");
    })
    .catch((e) => list.replaceChildren(el("li", {}, errorBox(`Cannot tell where you are: ${e.message}`))));
  return card;
}

const routes = {
  "/login": {
    public: true,
    render: () => show(credentialsForm({
      title: "Log in",
      button: "Log in",
      submit: logInAndGoHome,
      alternative: el("p", {}, "New here? ", el("a", { href: "/signup", "data-link": true }, "Create an account")),
    })),
  },
  "/signup": {
    public: true,
    render: () => show(credentialsForm({
      title: "Create an account",
      button: "Sign up",
      note: "At least 8 characters. Your password encrypts your vault on this device; the server never sees it.",
      acknowledge: "I understand that polydev cannot recover my password: if I lose it, the credentials in my vault are lost.",
      submit: async (email, password, acknowledged) => {
        currentUser = await session.signUp(email, password, acknowledged);
        go("/");
      },
      alternative: el("p", {}, "Have an account? ", el("a", { href: "/login", "data-link": true }, "Log in")),
    })),
  },
  "/unlock": {
    title: "Unlock",
    render: () => {
      const password = el("input", { type: "password", id: "password", autocomplete: "current-password", required: true });
      const status = el("div", { class: "status" });
      const button = el("button", { type: "submit" }, "Unlock");
      const form = el("form", { class: "card", novalidate: true },
        el("h1", {}, "Unlock your vault"),
        el("p", { class: "muted" }, `Signed in as ${currentUser.email}. Your password unlocks your vault on this device.`),
        el("p", { class: "muted", id: "why-locked" }, "Why locked: your vault's key lives only in this tab's memory, never on disk or on the server, so a reload, a new tab or a while idle locks it again."),
        el("label", { for: "password" }, "Password"), password, button, status);
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        button.disabled = true;
        status.replaceChildren();
        try {
          await session.unlock(currentUser, password.value);
          go("/");
        } catch (e) {
          status.replaceChildren(errorBox(e.message));
        } finally {
          button.disabled = false;
        }
      });
      show(form);
    },
  },
  "/": {
    title: "Home",
    render: () => show(
      el("h1", {}, "Home"),
      el("p", { id: "welcome" }, `Signed in as ${currentUser.email}.`),
      el("p", { id: "vault-state", class: "muted" }, "Vault unlocked on this device."),
      firstSteps(),
      el("section", { class: "card" },
        el("h2", {}, "Runs"),
        el("p", {}, "Ask several AI coding CLIs at once, each in its own sandbox: ",
          el("a", { href: "/runs", "data-link": true }, "start a run"), "."),
        el("p", { class: "muted" }, "Runs use your providers' API keys, sealed in this tab to each run's sandbox.")),
      el("section", { class: "card" },
        el("h2", {}, "Providers"),
        el("p", {}, "Sign each CLI in (in a remote browser streamed here, or with a code) or save its API key: ",
          el("a", { href: "/providers", "data-link": true }, "connect providers"), ".")),
    ),
  },
  "/providers": {
    title: "Providers",
    // Sign-in sessions with the streamed remote browser (web/public/providers.js).
    render: async () => (await import("/providers.js")).renderProviders(view, currentUser),
  },
  "/runs": {
    title: "Runs",
    // The answers stream in side by side (web/public/runs.js).
    render: async () => (await import("/runs.js")).renderRuns(view),
  },
  "/admin/health": {
    title: "Host health",
    admin: true,
    // Loaded on demand: only this page needs the chart library.
    render: async () => (await import("/health.js")).renderHealth(view),
  },
  "/admin/sandboxes": {
    title: "Sandboxes",
    admin: true,
    // Images (and how far their preparation is), pools, live sandboxes
    // (web/public/sandboxes.js).
    render: async () => (await import("/sandboxes.js")).renderSandboxes(view),
  },
  "/admin/users": {
    title: "Users",
    admin: true,
    render: async () => {
      show(el("h1", {}, "Users"), el("p", { class: "muted" }, "Loading…"));
      try {
        const { users, total } = await api.users();
        const rows = users.map((u) => el("tr", {},
          el("td", {}, u.email), el("td", {}, u.role), el("td", {}, new Date(u.createdAt).toLocaleString())));
        show(el("h1", {}, "Users"), el("p", { class: "muted" }, `${total} in all`),
          el("table", { class: "grid" },
            el("thead", {}, el("tr", {}, el("th", {}, "Email"), el("th", {}, "Role"), el("th", {}, "Created"))),
            el("tbody", {}, rows)));
      } catch (e) {
        show(el("h1", {}, "Users"), errorBox(e.message));
      }
    },
  },
};

function renderChrome() {
  const links = Object.entries(routes)
    .filter(([, r]) => r.title && currentUser && (!r.admin || currentUser.role === "admin"))
    // Unlock is a way back in, not a place to go while unlocked.
    .filter(([path]) => !(path === "/unlock" && session.isUnlocked()))
    .map(([path, r]) => el("a", {
      href: path, "data-link": true, "aria-current": location.pathname === path ? "page" : false,
    }, r.title));
  nav.replaceChildren(...links);
  who.replaceChildren(...(currentUser
    ? [
      el("span", { class: "muted" }, currentUser.email),
      session.isUnlocked() ? el("button", { id: "lock", class: "link", onclick: () => { session.lock(); go("/unlock"); } }, "Lock") : null,
      el("button", { id: "logout", class: "link", onclick: logOut }, "Log out"),
    ].filter(Boolean)
    : []));
}

async function logOut() {
  session.lock();
  try {
    await api.logOut();
  } catch (e) {
    // Already signed out: fine.
  }
  currentUser = null;
  go("/login");
}

async function render() {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  const route = routes[location.pathname];
  document.title = route && route.title ? `${route.title} · polydev` : route ? "polydev" : "Not found · polydev";
  if (!route) {
    renderChrome();
    show(el("h1", {}, "Not found"), el("p", {}, el("a", { href: "/", "data-link": true }, "Home")));
    return;
  }
  if (!route.public && !currentUser) {
    try {
      currentUser = await api.me();
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        go("/login");
        return;
      }
      renderChrome();
      show(errorBox(e.message));
      return;
    }
  }
  if (!route.public && location.pathname !== "/unlock" && !session.isUnlocked()) {
    go("/unlock");
    return;
  }
  if (location.pathname === "/unlock" && session.isUnlocked()) {
    go("/");
    return;
  }
  if (route.admin && currentUser.role !== "admin") {
    renderChrome();
    show(errorBox("This page is for admins."));
    return;
  }
  renderChrome();
  // The page changes even when the server cannot be reached: its heading
  // and why, never the previous page under a new address.
  try {
    const stop = await route.render();
    if (typeof stop === "function") cleanup = stop;
  } catch (e) {
    show(el("h1", {}, route.title || "polydev"),
      errorBox(`Cannot load this page: ${e.message}. Is the server reachable?`),
      el("p", {}, el("a", { href: location.pathname, "data-link": true }, "Try again")));
  }
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (link && link.origin === location.origin && !event.metaKey && !event.ctrlKey) {
    event.preventDefault();
    go(link.pathname);
  }
});
window.addEventListener("popstate", render);
session.armAutoLock(() => {
  if (currentUser) go("/unlock");
});
render();
