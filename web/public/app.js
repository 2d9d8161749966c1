// polydev web UI: a small client-side router over plain DOM. Later pages
// (vault unlock, providers, runs, login viewer, admin dashboard) register
// themselves in `routes` and in the nav.

import { api, ApiError } from "/api.js";
import { el, errorBox } from "/dom.js";

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
function credentialsForm({ title, button, note, submit, alternative }) {
  const email = el("input", { type: "email", name: "email", id: "email", autocomplete: "username", required: true });
  const password = el("input", {
    type: "password", name: "password", id: "password", minlength: "8", required: true,
    autocomplete: button === "Sign up" ? "new-password" : "current-password",
  });
  const status = el("div", { class: "status" });
  const submitButton = el("button", { type: "submit" }, button);
  const form = el("form", { class: "card", novalidate: true },
    el("h1", {}, title),
    el("label", { for: "email" }, "Email"), email,
    el("label", { for: "password" }, "Password"), password,
    note ? el("p", { class: "muted small" }, note) : null,
    submitButton, status, alternative);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submitButton.disabled = true;
    status.replaceChildren();
    try {
      await submit(email.value, password.value);
    } catch (e) {
      status.replaceChildren(errorBox(e.message));
    } finally {
      submitButton.disabled = false;
    }
  });
  return form;
}

async function logInAndGoHome(email, password) {
  const result = await api.logIn(email, password);
  currentUser = result.user;
  go("/");
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
      note: "At least 8 characters.",
      submit: async (email, password) => {
        await api.signUp(email, password);
        await logInAndGoHome(email, password);
      },
      alternative: el("p", {}, "Have an account? ", el("a", { href: "/login", "data-link": true }, "Log in")),
    })),
  },
  "/": {
    title: "Home",
    render: () => show(
      el("h1", {}, "Home"),
      el("p", { id: "welcome" }, `Signed in as ${currentUser.email}.`),
      el("section", { class: "card" },
        el("h2", {}, "Providers"),
        el("p", { class: "muted" }, "Connecting Claude Code, Codex and Gemini CLI is not available on this server yet.")),
    ),
  },
  "/admin/health": {
    title: "Host health",
    admin: true,
    // Loaded on demand: only this page needs the chart library.
    render: async () => (await import("/health.js")).renderHealth(view),
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
    .map(([path, r]) => el("a", {
      href: path, "data-link": true, "aria-current": location.pathname === path ? "page" : false,
    }, r.title));
  nav.replaceChildren(...links);
  who.replaceChildren(...(currentUser
    ? [el("span", { class: "muted" }, currentUser.email), el("button", { id: "logout", class: "link", onclick: logOut }, "Log out")]
    : []));
}

async function logOut() {
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
  if (route.admin && currentUser.role !== "admin") {
    renderChrome();
    show(errorBox("This page is for admins."));
    return;
  }
  renderChrome();
  const stop = await route.render();
  if (typeof stop === "function") cleanup = stop;
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-link]");
  if (link && link.origin === location.origin && !event.metaKey && !event.ctrlKey) {
    event.preventDefault();
    go(link.pathname);
  }
});
window.addEventListener("popstate", render);
render();
