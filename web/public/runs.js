// The run page: one prompt to Claude Code, Codex and Gemini CLI, answers
// streaming in side by side. API keys typed here are sealed in this tab to
// each run sandbox's key (HPKE, the same format as polydev-vault); the
// server only relays the sealed boxes.

import { api } from "/api.js";
import { el, errorBox } from "/dom.js";
import { seal } from "/vault.js";
import { getSecret, openLoginCredential } from "/session.js";

const PROVIDERS = [
  { id: "claude_code", name: "Claude Code", key: "Anthropic API key" },
  { id: "codex", name: "Codex", key: "OpenAI API key" },
  { id: "gemini_cli", name: "Gemini CLI", key: "Gemini API key" },
];
const PURPOSE = "polydev/run-credential/v1";
const enc = new TextEncoder();

const b64 = {
  decode: (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0)),
  encode: (b) => btoa(String.fromCharCode(...b)),
};

export function renderRuns(view) {
  const prompt = el("textarea", { id: "prompt", rows: "4", required: true, placeholder: "Ask all three…" });
  const choices = PROVIDERS.map((p) => {
    const check = el("input", { type: "checkbox", id: `use-${p.id}`, checked: true });
    const key = el("input", { type: "password", id: `key-${p.id}`, autocomplete: "off", placeholder: p.key });
    return { ...p, check, key };
  });
  const run = el("button", { type: "submit", id: "run" }, "Run");
  const cancel = el("button", { type: "button", id: "cancel", disabled: true }, "Cancel");
  const status = el("div", { class: "status", id: "run-status" });
  const columns = el("div", { class: "columns", id: "answers" });
  let source = null;
  let current = null;

  const form = el("form", { class: "card", novalidate: true },
    el("h1", {}, "Runs"),
    el("label", { for: "prompt" }, "Prompt"), prompt,
    ...choices.map((c) => el("div", { class: "provider-row" },
      el("label", { for: c.check.id, class: "check" }, c.check, " ", c.name), c.key)),
    el("p", { class: "muted small" }, "Keys are sealed in this tab to each run's sandbox; the server never sees them. Keys saved on the Providers page fill in here."),
    el("div", { class: "actions" }, run, cancel), status);

  // Keys saved on the providers page fill in (decrypted here, never sent);
  // a CLI signed in on the providers page can run on that login instead.
  const signedIn = new Set();
  for (const c of choices) {
    getSecret(`apikey.${c.id}`).then((k) => { if (k && !c.key.value) c.key.value = k; }).catch(() => {});
  }
  api.vaultItems().then(({ items }) => {
    for (const c of choices) {
      if (items.some((i) => i.id === `credential.${c.id}`)) {
        signedIn.add(c.id);
        c.key.placeholder = `${c.key.placeholder} (empty: use your ${c.name} login)`;
      }
    }
  }).catch(() => {});

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.replaceChildren();
    const chosen = choices.filter((c) => c.check.checked);
    if (!prompt.value.trim() || chosen.length === 0) {
      status.replaceChildren(errorBox("Write a prompt and choose at least one provider."));
      return;
    }
    const missing = chosen.find((c) => !c.key.value && !signedIn.has(c.id));
    if (missing) {
      status.replaceChildren(errorBox(`Enter the ${missing.key} for ${missing.name}.`));
      return;
    }
    run.disabled = true;
    if (source) source.close();
    const cells = {};
    columns.replaceChildren(...chosen.map((c) => {
      const state = el("span", { class: "state", id: `state-${c.id}` }, "starting");
      const answer = el("pre", { class: "answer", id: `answer-${c.id}` });
      cells[c.id] = { state, answer };
      return el("section", { class: "card column" }, el("h2", {}, c.name, " ", state), answer);
    }));
    try {
      const started = await api.startRun(prompt.value, chosen.map((c) => c.id));
      current = started.runId;
      const credentials = {};
      const kinds = {};
      for (const c of chosen) {
        const pk = b64.decode(started.sandboxes[c.id].publicKey);
        // A typed (or saved) key wins; else the CLI's own login file.
        let secret = c.key.value ? enc.encode(c.key.value) : await openLoginCredential(c.id);
        kinds[c.id] = c.key.value ? "api_key" : "cli_login";
        const sealed = await seal(pk, PURPOSE, enc.encode(`${current}/${c.id}`), secret);
        secret.fill(0);
        credentials[c.id] = b64.encode(sealed);
      }
      await api.runCredentials(current, credentials, kinds);
      cancel.disabled = false;
      source = new EventSource(`/api/runs/${encodeURIComponent(current)}/events`);
      const on = (kind, fn) => source.addEventListener(kind, (e) => {
        const data = JSON.parse(e.data);
        const cell = cells[data.provider];
        if (cell) fn(cell, data);
      });
      on("started", (cell) => { cell.state.textContent = "running"; });
      on("delta", (cell, d) => { cell.answer.textContent += d.text; });
      on("done", (cell) => { cell.state.textContent = "done"; });
      on("error", (cell, d) => {
        cell.state.textContent = d.stage === "cancelled" ? "cancelled" : "failed";
        cell.answer.append(el("span", { class: "error-text" }, `\n${d.stage}: ${d.message}`));
      });
      // The server ends the stream once every provider has finished.
      source.onerror = () => {
        source.close();
        run.disabled = false;
        cancel.disabled = true;
      };
    } catch (e) {
      status.replaceChildren(errorBox(e.message));
      run.disabled = false;
    }
  });
  cancel.addEventListener("click", async () => {
    if (current) {
      try {
        await api.cancelRun(current);
      } catch (e) {
        status.replaceChildren(errorBox(e.message));
      }
    }
  });
  view.replaceChildren(form, columns);
  return () => { if (source) source.close(); };
}
