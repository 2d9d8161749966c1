// The providers page: connect each CLI (the server's provider registry
// lists them) to your account. Three ways:
//  - Sign in: a remote browser in a sandbox, streamed here with noVNC
//    (the real client from npm) over the controller's WebSocket bridge;
//    the CLI's credential file is sealed to your vault inside the sandbox.
//  - Code: sign in in your own browser and paste the code back (no
//    remote browser; for the CLIs that offer it).
//  - API key: stored in your vault, encrypted in this tab.

import { api, ApiError } from "/api.js";
import { el, errorBox } from "/dom.js";
import * as session from "/session.js";

const LABELS = {
  booting: "Starting the remote browser…",
  ready: "Remote browser ready; starting the CLI's sign-in…",
  awaiting_login: "Sign in in the remote browser below.",
  awaiting_code: "Sign in with the link, then paste the code you get.",
  completed: "Connected: the credential is sealed in your vault.",
  failed: "The sign-in failed.",
  expired: "This sign-in session expired. Start a new one.",
  cancelled: "Cancelled.",
};

export async function renderProviders(view, user) {
  const status = el("div", { class: "status", id: "providers-status" });
  const panel = el("section", { id: "login-panel" });
  let active = null; // { stop() } of the session on screen

  // What this installation offers you per provider (sign-in modes, the
  // policy and its reason), from the provider registry.
  // The CLIs themselves come from there too: nothing here knows one.
  let list = [];
  let items = [];
  try {
    [list, items] = await Promise.all([
      api.providers(),
      api.vaultItems().then((r) => r.items),
    ]);
  } catch (e) {
    status.replaceChildren(errorBox(e.message));
  }
  const has = (id) => items.some((i) => i.id === id);

  const rows = list.map((info) => {
    const p = { id: info.id, name: info.name, key: info.keyLabel };
    const state = el("span", { id: `provider-state-${p.id}`, class: "muted" },
      has(`credential.${p.id}`) ? "signed in" : has(`apikey.${p.id}`) ? "API key saved" : has(`token.${p.id}`) ? "token saved" : has(`cloud.${p.id}`) ? "cloud key saved" : "not connected");
    const offered = (info && info.signInModes) || [];
    const policy = info && info.policy;
    const policyLine = policy
      ? el("p", { id: `policy-${p.id}`, class: "muted policy", "data-offered": String(policy.offeredToYou) },
        policy.offeredToYou ? "Sign-in with your own account is offered here. "
          : info.hasSignIn ? "Sign-in with a subscription account is not offered here: " : "No sign-in: ",
        policy.offeredToYou ? null : policy.reason + ". ",
        el("a", { href: policy.terms, target: "_blank", rel: "noopener noreferrer" }, "The vendor's terms"),
        info.version ? ` · CLI ${info.version}` : null)
      : null;
    // A code (device code or paste-back) is the first choice where the CLI
    // has one: no remote browser to stream. The streamed browser is for
    // the CLIs that need it.
    const codeFirst = offered.includes("code");
    const signIn = el("button", { type: "button", id: `signin-${p.id}`, class: codeFirst ? "secondary" : null, disabled: !offered.includes("browser") }, codeFirst ? "Sign in in a remote browser" : "Sign in");
    const code = el("button", { type: "button", id: `code-${p.id}`, class: codeFirst ? null : "secondary", disabled: !codeFirst }, "Sign in with a code");
    const keyInput = el("input", { type: "password", id: `apikey-${p.id}`, autocomplete: "off", placeholder: p.key });
    const saveKey = el("button", { type: "button", id: `save-key-${p.id}`, class: "secondary" }, "Save key");
    const start = (mode) => async () => {
      status.replaceChildren();
      if (active) active.stop();
      try {
        const s = await api.startLogin(user.id, p.id, mode);
        active = watchSession(panel, s.sessionId, p, () => { state.textContent = "signed in"; });
      } catch (e) {
        status.replaceChildren(errorBox(e.message));
      }
    };
    signIn.addEventListener("click", start("browser"));
    code.addEventListener("click", start("code"));
    saveKey.addEventListener("click", async () => {
      status.replaceChildren();
      if (!keyInput.value) return status.replaceChildren(errorBox(`Enter the ${p.key}.`));
      try {
        await session.putSecret(`apikey.${p.id}`, keyInput.value);
        keyInput.value = "";
        state.textContent = "API key saved";
      } catch (e) {
        status.replaceChildren(errorBox(e.message));
      }
    });
    // A second secret some CLIs take, saved to the vault beside the key.
    const secretRow = (kind, item, placeholder, what) => {
      const input = el("input", { type: "password", id: `${kind}-${p.id}`, autocomplete: "off", placeholder });
      const save = el("button", { type: "button", id: `save-${kind}-${p.id}`, class: "secondary" }, `Save ${what}`);
      save.addEventListener("click", async () => {
        status.replaceChildren();
        if (!input.value) return status.replaceChildren(errorBox(`Enter the ${what}.`));
        try {
          await session.putSecret(`${item}.${p.id}`, input.value);
          input.value = "";
          state.textContent = `${what} saved`;
        } catch (e) {
          status.replaceChildren(errorBox(e.message));
        }
      });
      return el("div", { class: "provider-row" }, input, save);
    };
    const kinds = info.credentialKinds || [];
    // A long-lived subscription token (Claude Code's `claude setup-token`)
    // where this installation offers one to you.
    const tokenRow = kinds.includes("subscription_token")
      ? secretRow("token", "token", "Subscription token (claude setup-token)", "token") : null;
    // A cloud account's key (Claude Code on Amazon Bedrock, Gemini CLI on
    // Vertex AI).
    const cloudRow = kinds.includes("cloud_key")
      ? [el("p", { class: "muted small", id: `cloud-hint-${p.id}` }, `Or on your cloud: ${info.cloudKeyHint}.`),
        secretRow("cloud", "cloud", info.cloudKeyLabel, "cloud key")] : [];
    return el("div", { class: "card provider" },
      el("h2", {}, p.name, " ", state),
      policyLine,
      // A CLI with no sign-in at all gets no sign-in buttons.
      info.hasSignIn ? el("div", { class: "actions" }, ...(codeFirst ? [code, signIn] : [signIn, code])) : null,
      el("p", { class: "muted small", id: `key-hint-${p.id}` }, `Its key: ${info.keyHint}.`),
      el("div", { class: "provider-row" }, keyInput, saveKey),
      tokenRow, ...cloudRow);
  });

  view.replaceChildren(
    el("h1", {}, "Providers"),
    el("p", { class: "muted" }, "Sign in to each CLI in a remote browser streamed into this tab, or with a code, or save an API key. Whatever you connect is sealed to your vault; the server cannot read it."),
    status, ...rows, panel);
  return () => { if (active) active.stop(); };
}

// Follows one session's state (SSE), shows the remote browser or the code
// form, and cleans up when it ends.
function watchSession(panel, id, provider, onDone) {
  const state = el("p", { id: "login-state", "data-state": "booting" }, LABELS.booting);
  const detail = el("div", { id: "login-detail" });
  const screen = el("div", { id: "viewer", class: "viewer" });
  const cancel = el("button", { type: "button", id: "login-cancel", class: "secondary" }, "Cancel");
  panel.replaceChildren(el("div", { class: "card" },
    el("h2", {}, `Sign in to ${provider.name}`), state, detail, screen, el("div", { class: "actions" }, cancel)));
  panel.scrollIntoView({ block: "start" });
  let viewer = null;
  let stopped = false;
  let source = null;
  let codeShown = false;

  const stop = () => {
    stopped = true;
    if (source) source.close();
    if (viewer) viewer.close();
  };
  cancel.addEventListener("click", async () => {
    try { await api.cancelLogin(id); } catch { /* gone already */ }
  });

  const show = (v) => {
    state.dataset.state = v.state;
    state.textContent = LABELS[v.state] || v.state;
    if (v.state === "failed") {
      detail.replaceChildren(errorBox(v.error || "failed"),
        v.logTail && v.logTail.length ? el("pre", { class: "log-tail" }, v.logTail.join("\n")) : null);
    }
    if (v.state === "awaiting_code" && !codeShown && v.authUrl) {
      codeShown = true;
      detail.replaceChildren(codeForm(id, v));
    } else if (v.state === "awaiting_code" && codeShown) {
      const pre = detail.querySelector("pre");
      if (pre) pre.textContent = (v.instructions || []).join("\n");
    }
    if (v.mode === "browser" && (v.state === "ready" || v.state === "awaiting_login") && !viewer) {
      viewer = openViewer(screen, id, () => stopped);
    }
    if (["completed", "failed", "expired", "cancelled"].includes(v.state)) {
      if (viewer) viewer.close();
      viewer = null;
      screen.replaceChildren();
      cancel.disabled = true;
      if (source) source.close();
      if (v.state === "completed") onDone();
    }
  };

  source = new EventSource(`/api/auth/session/${encodeURIComponent(id)}/events`);
  source.addEventListener("state", (e) => show(JSON.parse(e.data)));
  source.onerror = async () => {
    // The stream ends after a final state, or the server restarted: ask once.
    source.close();
    if (stopped) return;
    try {
      show(await api.loginSession(id));
    } catch (e) {
      if (e instanceof ApiError && e.status === 410) show({ state: "expired" });
      else detail.replaceChildren(errorBox(e.message));
    }
  };
  return { stop };
}

function codeForm(id, v) {
  const input = el("input", { id: "login-code", autocomplete: "off", placeholder: "Paste the code here" });
  const send = el("button", { type: "submit", id: "login-code-send" }, "Send code");
  const out = el("div", { class: "status" });
  const form = el("form", { class: "code-form" },
    el("p", {}, "1. Open ", el("a", { href: v.authUrl, target: "_blank", rel: "noopener noreferrer", id: "login-url" }, "the sign-in page"), " in your own browser and sign in."),
    el("p", {}, "2. Paste the code it shows (or follow the CLI's instructions below):"),
    el("pre", { class: "log-tail" }, (v.instructions || []).join("\n")),
    input, send, out);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    out.replaceChildren();
    send.disabled = true;
    try {
      await api.loginCode(id, input.value);
      input.value = "";
    } catch (e) {
      out.replaceChildren(errorBox(e.message));
    } finally {
      send.disabled = false;
    }
  });
  return form;
}

// The real noVNC client on a fresh single-use ticket; reconnects (with a
// new ticket) while the session lives.
function openViewer(screen, id, isStopped) {
  let rfb = null;
  let closed = false;
  let attempts = 0;
  const note = el("p", { id: "viewer-note", class: "muted small" }, "Connecting…");
  const holder = el("div", { id: "viewer-screen", class: "viewer-screen" });
  screen.replaceChildren(note, holder);

  const connect = async () => {
    if (closed || isStopped()) return;
    let ticket;
    try {
      ticket = await api.loginTicket(id);
    } catch (e) {
      note.textContent = e instanceof ApiError && e.status === 410 ? "The session ended." : e.message;
      return;
    }
    const { default: RFB } = await import("/vendor/novnc.js");
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${ticket.path}`;
    rfb = new RFB(holder, url, { wsProtocols: ["binary"] });
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.focusOnClick = true;
    rfb.addEventListener("connect", () => {
      attempts = 0;
      note.textContent = "Connected. Click into the screen to type.";
      screen.dataset.connected = "true";
    });
    rfb.addEventListener("disconnect", (e) => {
      screen.dataset.connected = "false";
      rfb = null;
      if (closed || isStopped()) return;
      attempts += 1;
      if (attempts > 5) {
        note.textContent = "Lost the connection to the remote browser.";
        return;
      }
      note.textContent = e.detail.clean ? "Disconnected; reconnecting…" : "Connection lost; reconnecting…";
      setTimeout(connect, 500 * attempts);
    });
  };
  connect();
  return {
    close() {
      closed = true;
      if (rfb) rfb.disconnect();
    },
  };
}
