// The run page: one prompt to the CLIs you choose (the server's provider
// registry lists them), answers
// streaming in side by side, and the runs you made before. API keys typed
// here are sealed in this tab to each run sandbox's key (HPKE, the same
// format as polydev-vault); the server only relays the sealed boxes.
// Answers are stored sealed to your vault key and opened here.

import { api, ApiError } from "/api.js";
import { el, errorBox } from "/dom.js";
import { seal } from "/vault.js";
import { getSecret, openLoginCredential, openRunAnswer, openRunDiff, openRunPrompt } from "/session.js";
import { copyButton, showAnswer } from "/markdown.js";
import { diffView, readPicked, sealedUpload } from "/workspace.js";

// The CLIs' names, from the provider registry once it has answered.
const NAMES = {};
const PURPOSE = "polydev/run-credential/v1";
const enc = new TextEncoder();

const b64 = {
  decode: (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0)),
  encode: (b) => btoa(String.fromCharCode(...b)),
};

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// Vendors' usage windows as people say them.
const WINDOW_NAMES = new Map([["five_hour", "5-hour"], ["seven_day", "7-day"]]);

/// A reset time (Unix seconds) in this browser's time zone.
const when = (secs) => new Date(secs * 1000).toLocaleString([], { dateStyle: "medium", timeStyle: "short" });

/// Starts a run; while the server is still preparing the CLIs' environment
/// (a first start), or runs as many CLIs as it can, says so and tries again.
async function startWhenReady(prompt, providers, say, stopped, workspace) {
  for (;;) {
    try {
      return await api.startRun(prompt, providers, workspace);
    } catch (e) {
      if (!(e instanceof ApiError) || !["environment_preparing", "runs_at_capacity"].includes(e.code) || stopped()) throw e;
      say(`${e.message} Waiting…`);
      await sleep(Math.min(30, Math.max(2, e.retryAfter || 10)) * 1000);
    }
  }
}

/// The CLIs that take a workspace (the server's `works_on_code`).
const CODE_CLIS = ["claude_code", "codex", "gemini_cli"];

/// A button that fetches one provider's sealed diff, opens it with your
/// vault and shows it (with the patch to download).
function changesButton(runId, provider) {
  const box = el("div", { class: "diff-box" });
  const show = el("button", { type: "button", class: "secondary", "data-diff": provider }, "Show changes");
  show.addEventListener("click", async () => {
    show.disabled = true;
    try {
      const r = await api.runDiff(runId, provider);
      const patch = await openRunDiff(runId, provider, r.sealed);
      box.replaceChildren(diffView(patch, `${runId}-${provider}.patch`));
      show.remove();
    } catch (e) {
      show.disabled = false;
      box.replaceChildren(errorBox(`Cannot open the changes: ${e.message}`));
    }
  });
  return el("div", {}, show, box);
}

export function renderRuns(view) {
  const prompt = el("textarea", { id: "prompt", rows: "4", required: true, placeholder: "Ask them all…" });
  // Filled from the registry: a CLI is chosen when you have a key or a
  // sign-in for it, or type a key into its row.
  const choices = [];
  const rows = el("div", { id: "provider-choices" }, el("p", { class: "muted" }, "Loading the CLIs…"));
  // Until the CLIs and your saved keys are in, nothing can be sent as the
  // wrong kind.
  const run = el("button", { type: "submit", id: "run", disabled: true }, "Run");
  const cancel = el("button", { type: "button", id: "cancel", disabled: true }, "Cancel");
  const status = el("div", { class: "status", id: "run-status" });
  const columns = el("div", { class: "columns", id: "answers" });
  const history = el("div", { id: "history" });
  let source = null;
  let current = null;
  let gone = false;

  // Optional: your code for the CLIs to work on (a folder, or a .tar).
  const files = el("input", { type: "file", id: "workspace-files", multiple: true, webkitdirectory: true });
  const tarFile = el("input", { type: "file", id: "workspace-tar", accept: ".tar,.bundle,application/x-tar" });
  const mode = el("select", { id: "workspace-mode" },
    el("option", { value: "edit" }, "may change it (edit: each CLI's changes come back as a diff)"),
    el("option", { value: "ask" }, "reads it only (ask)"));
  const picked = el("p", { class: "muted small", id: "workspace-picked", "aria-live": "polite" });
  let workspace = null;
  const pick = async (list) => {
    workspace = null;
    picked.textContent = "";
    if (!list || list.length === 0) return;
    try {
      const w = await readPicked(list);
      workspace = w.archive;
      picked.textContent = `${w.count === null ? "An archive" : `${w.count} files`}, ${(workspace.length / 1024).toFixed(0)} KiB as a tar archive; sealed in this tab to each CLI's sandbox.`;
    } catch (e) {
      picked.replaceChildren(errorBox(e.message));
    }
  };
  files.addEventListener("change", () => { tarFile.value = ""; pick(files.files); });
  tarFile.addEventListener("change", () => { files.value = ""; pick(tarFile.files); });
  const code = el("details", { class: "workspace", id: "workspace" },
    el("summary", {}, "Code (optional): let the CLIs work on your project"),
    el("label", { for: "workspace-files" }, "A folder"), files,
    el("label", { for: "workspace-tar" }, "or a .tar archive or git bundle"), tarFile,
    el("label", { for: "workspace-mode" }, "The CLIs"), mode, picked,
    el("p", { class: "muted small" }, "Claude Code, Codex and Gemini CLI work on code; each gets its own copy. The server relays only what this tab sealed."));

  const form = el("form", { class: "card", novalidate: true },
    el("h1", {}, "Runs"),
    el("label", { for: "prompt" }, "Prompt"), prompt,
    rows, code,
    el("p", { class: "muted small" }, "Keys are sealed in this tab to each run's sandbox; the server never sees them. Keys saved on the Providers page fill in here."),
    el("div", { class: "actions" }, run, cancel), status);

  // Keys saved on the providers page fill in (decrypted here, never sent);
  // a CLI signed in on the providers page can run on that login instead.
  // Only items the list names are fetched (no 404 per missing key).
  const signedIn = new Set();
  const tokens = new Set();
  const clouds = new Set();
  const pending = [];
  Promise.all([api.providers(), api.vaultItems().then((r) => r.items).catch(() => [])]).then(([list, items]) => {
    const has = (id) => items.some((i) => i.id === id);
    for (const p of list) {
      NAMES[p.id] = p.name;
      const check = el("input", { type: "checkbox", id: `use-${p.id}` });
      const keyInput = el("input", { type: "password", id: `key-${p.id}`, autocomplete: "off", placeholder: p.keyLabel, title: p.keyHint });
      keyInput.addEventListener("input", () => { if (keyInput.value) check.checked = true; });
      const c = { id: p.id, name: p.name, keyLabel: p.keyLabel, kinds: p.credentialKinds || [], cloudPrefixes: p.cloudKeyPrefixes || [], check, keyInput };
      choices.push(c);
      if (has(`apikey.${c.id}`)) {
        check.checked = true;
        pending.push(getSecret(`apikey.${c.id}`).then((k) => { if (k && !c.keyInput.value) c.keyInput.value = k; }).catch(() => {}));
      }
      if (has(`credential.${c.id}`)) {
        check.checked = true;
        signedIn.add(c.id);
        c.keyInput.placeholder = `${c.keyLabel} (empty: use your ${c.name} login)`;
      } else if (has(`token.${c.id}`) && (p.credentialKinds || []).includes("subscription_token")) {
        // A long-lived subscription token saved on the Providers page.
        check.checked = true;
        tokens.add(c.id);
        c.keyInput.placeholder = `${c.keyLabel} (empty: use your saved ${c.name} token)`;
      } else if (has(`cloud.${c.id}`) && (p.credentialKinds || []).includes("cloud_key")) {
        // A cloud account's key saved on the Providers page.
        check.checked = true;
        clouds.add(c.id);
        c.keyInput.placeholder = `${c.keyLabel} (empty: use your saved ${p.cloudKeyLabel})`;
      }
    }
    rows.replaceChildren(...choices.map((c) => el("div", { class: "provider-row" },
      el("label", { for: c.check.id, class: "check" }, c.check, " ", c.name), c.keyInput)));
    return Promise.all(pending);
  }).then(() => { run.disabled = false; })
    .catch((e) => rows.replaceChildren(errorBox(`Cannot list the CLIs: ${e.message}`)));

  const finish = () => {
    if (source) source.close();
    source = null;
    run.disabled = false;
    cancel.disabled = true;
    refreshHistory();
  };

  /// Follows a run's events until the server ends the stream (`end`). A
  /// provider's failure ends only its column; a dropped connection is
  /// reopened by the browser and the run replayed.
  function follow(runId, cells, onTurn) {
    source = new EventSource(`/api/runs/${encodeURIComponent(runId)}/events`);
    const started = Date.now();
    const tick = setInterval(() => {
      for (const cell of Object.values(cells)) {
        if (!cell.ended) cell.clock.textContent = ` ${Math.round((Date.now() - started) / 1000)} s`;
      }
    }, 1000);
    const on = (kind, fn) => source.addEventListener(kind, (e) => {
      const data = JSON.parse(e.data);
      const cell = cells[data.provider];
      if (cell) fn(cell, data);
    });
    const seen = new Set();
    // Another of your runs holds this provider's credential: this one waits
    // its turn, then gets its credential (sealed only then, so a CLI login
    // file is the one the run before refreshed).
    on("queued", (cell, d) => {
      cell.stop.disabled = false;
      cell.state.textContent = `queued (${d.position} ahead)`;
      cell.note.textContent = "Waiting for your other run on this provider to finish.";
    });
    on("awaiting_credentials", (cell, d) => {
      cell.state.textContent = "starting";
      cell.note.textContent = "";
      onTurn(d.provider);
    });
    on("started", (cell) => { cell.state.textContent = "running"; cell.stop.disabled = false; });
    on("delta", (cell, d) => {
      // A reconnect replays the run: skip what is already shown.
      cell.n = (cell.n || 0) + 1;
      if (cell.n <= (cell.shown || 0)) return;
      cell.shown = cell.n;
      cell.answer.textContent += d.text;
    });
    // What the CLI changed in the workspace: opened here on demand.
    on("diff", (cell, d) => {
      if (d.error) {
        cell.changes.replaceChildren(el("p", { class: "error-text" }, d.error));
        return;
      }
      if (!d.bytes) {
        cell.changes.replaceChildren(el("p", { class: "muted small" }, "No changes to the code."));
        return;
      }
      cell.changes.replaceChildren(changesButton(runId, d.provider));
    });
    on("retrying", (cell, d) => { cell.state.textContent = `retrying (${d.attempt})`; cell.note.textContent = d.message; });
    on("done", (cell, d) => {
      cell.ended = true;
      cell.stop.remove();
      cell.state.textContent = "done";
      // The whole answer is in: shown as Markdown (streamed as text).
      cell.raw = cell.raw ?? cell.answer.textContent;
      showAnswer(cell.answer, cell.raw);
      const u = d.usage || {};
      const parts = [];
      if (u.inputTokens != null || u.outputTokens != null) parts.push(`${u.inputTokens ?? "?"} tokens in, ${u.outputTokens ?? "?"} out`);
      // At the vendor's list prices, as the CLI computed it (not a bill).
      if (u.costUsd != null && Number.isFinite(u.costUsd) && u.costUsd >= 0) {
        const c = u.costUsd;
        parts.push(`${c < 0.0001 ? "<$0.0001" : c < 0.01 ? `$${c.toFixed(4)}` : c < 1e6 ? `$${c.toFixed(2)}` : ">$1,000,000"} at list price`);
      }
      // Where your subscription stands, when the CLI said (Claude Code on
      // a sign-in): each window's share used and when it resets.
      for (const w of (d.limits && d.limits.windows) || []) {
        const name = WINDOW_NAMES.get(w.name) || String(w.name).replaceAll("_", " ");
        const used = Number.isFinite(w.usedPercent) ? `${Math.round(w.usedPercent)}% used` : "used";
        parts.push(`${name} window ${used}${w.resetsAt ? `, resets ${when(w.resetsAt)}` : ""}`);
      }
      cell.note.textContent = parts.join(" · ");
    });
    on("error", (cell, d) => {
      cell.ended = true;
      cell.stop.remove();
      cell.state.textContent = { cancelled: "cancelled", timeout: "timed out", rate_limited: "rate-limited", queue: "gave up waiting" }[d.stage] || "failed";
      cell.note.textContent = d.resetsAt ? `The limit resets ${when(d.resetsAt)}.` : "";
      if (!seen.has(cell)) cell.answer.append(el("span", { class: "error-text" }, `\n${d.message}`));
      seen.add(cell);
    });
    source.addEventListener("end", () => { clearInterval(tick); finish(); });
    // Connection trouble (a server-sent `error` event carries data and is
    // handled above): the browser reconnects on its own; give up only
    // when it has closed the stream for good.
    source.onerror = (e) => {
      if (e.data !== undefined) return;
      for (const cell of Object.values(cells)) cell.n = 0;
      if (source && source.readyState === EventSource.CLOSED) {
        clearInterval(tick);
        status.replaceChildren(errorBox("Lost the connection to the server; the run's answers will be in your runs below once it ends."));
        finish();
      }
    };
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.replaceChildren();
    const chosen = choices.filter((c) => c.check.checked);
    const onCode = chosen.filter((c) => !CODE_CLIS.includes(c.id));
    if (workspace && onCode.length) {
      status.replaceChildren(errorBox(`${onCode.map((c) => c.name).join(" and ")} cannot work on code yet: untick it, or remove the code.`));
      return;
    }
    if (!prompt.value.trim() || chosen.length === 0) {
      status.replaceChildren(errorBox("Write a prompt and choose at least one provider."));
      return;
    }
    const missing = chosen.find((c) => !c.keyInput.value && !signedIn.has(c.id) && !tokens.has(c.id) && !clouds.has(c.id));
    if (missing) {
      status.replaceChildren(errorBox(`Enter your ${missing.keyLabel} for ${missing.name}, or sign ${missing.name} in on the Providers page.`));
      return;
    }
    run.disabled = true;
    if (source) source.close();
    const cells = {};
    columns.replaceChildren(...chosen.map((c) => {
      const state = el("span", { class: "state", id: `state-${c.id}` }, "starting");
      const clock = el("span", { class: "state" });
      const note = el("p", { class: "muted small", id: `note-${c.id}` });
      const answer = el("div", { class: "answer", id: `answer-${c.id}` });
      const changes = el("div", { class: "changes", id: `changes-${c.id}` });
      // Stops this CLI alone (the others go on).
      const stop = el("button", { type: "button", class: "secondary copy", id: `stop-${c.id}`, disabled: true }, "Stop");
      const cell = { state, clock, note, answer, stop, changes };
      cells[c.id] = cell;
      stop.addEventListener("click", async () => {
        stop.disabled = true;
        try {
          await api.cancelRunProvider(current, c.id);
        } catch (e) {
          stop.disabled = false;
          cell.note.textContent = e.message;
        }
      });
      const copy = copyButton("Copy", () => cell.raw ?? answer.textContent);
      return el("section", { class: "card column" }, el("h2", {}, c.name, " ", state, clock, stop, copy), note, answer, changes);
    }));
    try {
      const say = (text) => status.replaceChildren(el("p", { class: "muted" }, text));
      const archive = workspace;
      const started = await startWhenReady(prompt.value, chosen.map((c) => c.id), say, () => gone,
        archive ? { mode: mode.value, bytes: archive.length } : undefined);
      status.replaceChildren();
      current = started.runId;
      const runId = current;
      // The code first, sealed to each sandbox here: a CLI starts on it.
      if (archive) {
        await Promise.all(chosen.map(async (c) => {
          cells[c.id].state.textContent = "sending the code";
          const body = await sealedUpload(b64.decode(started.sandboxes[c.id].publicKey), runId, c.id, archive);
          await api.runWorkspace(runId, c.id, body);
          cells[c.id].state.textContent = "starting";
        }));
      }
      // Seals each provider's credential to its sandbox and hands them over.
      const send = async (ids) => {
        const credentials = {};
        const kinds = {};
        for (const c of chosen.filter((c) => ids.includes(c.id))) {
          const pk = b64.decode(started.sandboxes[c.id].publicKey);
          // A typed (or saved) key wins; else the CLI's own login file,
          // else a saved subscription token.
          let secret;
          if (c.keyInput.value) {
            secret = enc.encode(c.keyInput.value);
            // A Claude setup-token pasted as a key is sent as what it is.
            // A Claude setup-token or an Amazon Bedrock key pasted as a key
            // is sent as what it is.
            const typed = c.keyInput.value;
            kinds[c.id] = typed.startsWith("sk-ant-oat") && c.kinds.includes("subscription_token") ? "subscription_token"
              : c.cloudPrefixes.some((x) => typed.startsWith(x)) ? "cloud_key"
              : "api_key";
          } else if (signedIn.has(c.id)) {
            secret = await openLoginCredential(c.id);
            kinds[c.id] = "cli_login";
          } else {
            const cloud = clouds.has(c.id);
            const saved = await getSecret(`${cloud ? "cloud" : "token"}.${c.id}`);
            if (!saved) throw new Error(`Your saved ${c.name} ${cloud ? "cloud key" : "token"} is gone; save it again on the Providers page, or enter a key.`);
            secret = enc.encode(saved);
            kinds[c.id] = cloud ? "cloud_key" : "subscription_token";
          }
          const sealed = await seal(pk, PURPOSE, enc.encode(`${runId}/${c.id}`), secret);
          secret.fill(0);
          credentials[c.id] = b64.encode(sealed);
        }
        await api.runCredentials(runId, credentials, kinds);
      };
      const queued = chosen.filter((c) => started.sandboxes[c.id].state === "queued").map((c) => c.id);
      for (const id of queued) {
        cells[id].state.textContent = `queued (${started.sandboxes[id].queuePosition || 1} ahead)`;
      }
      const now = chosen.map((c) => c.id).filter((id) => !queued.includes(id));
      const sent = new Set(now);
      if (now.length) await send(now);
      cancel.disabled = false;
      follow(runId, cells, async (provider) => {
        if (sent.has(provider)) return; // a reconnect replays the event
        sent.add(provider);
        try {
          await send([provider]);
        } catch (e) {
          status.replaceChildren(errorBox(e.message));
        }
      });
      refreshHistory();
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

  /// Your runs, newest first: running ones can be cancelled, finished ones
  /// opened (prompts and answers are sealed to your vault key and opened
  /// here); a search box filters them by prompt, CLI and state.
  const search = el("input", { type: "search", id: "history-search", placeholder: "Search your runs", "aria-label": "Search your runs", autocomplete: "off" });
  const shown = el("p", { class: "muted small", id: "history-count", "aria-live": "polite" });
  let entries = [];
  const filter = () => {
    const q = search.value.trim().toLowerCase();
    let n = 0;
    for (const e of entries) {
      const hit = !q || e.text.includes(q);
      e.row.hidden = !hit;
      if (hit) n += 1;
    }
    shown.textContent = q ? `${n} of ${entries.length} runs match.` : `${entries.length} runs.`;
    if (q && n === 0) shown.textContent = `No run matches "${search.value.trim()}".`;
  };
  search.addEventListener("input", filter);
  async function refreshHistory() {
    let runs;
    try {
      runs = (await api.runs()).runs || [];
    } catch (e) {
      history.replaceChildren(errorBox(e.message));
      return;
    }
    if (runs.length === 0) {
      history.replaceChildren(el("section", { class: "card" }, el("h2", {}, "Your runs"),
        el("p", { class: "muted", id: "history-empty" }, "No runs yet: your questions and their answers will be kept here, sealed to your vault.")));
      return;
    }
    entries = await Promise.all(runs.map(async (r) => {
      const when = new Date(r.createdAtMs).toLocaleString();
      const states = (r.providers || []).map((p) => `${NAMES[p.provider] || p.provider}: ${p.state}`).join(", ");
      let prompt = "";
      if (r.prompt) {
        try {
          prompt = await openRunPrompt(r.runId, r.prompt);
        } catch (e) {
          prompt = "";
        }
      }
      const body = el("div", { class: "columns" });
      const actions = el("div", { class: "actions" });
      if (r.state === "running") {
        const stop = el("button", { type: "button", class: "link", "data-cancel": r.runId }, "Cancel");
        stop.addEventListener("click", async () => {
          try {
            await api.cancelRun(r.runId);
          } catch (e) {
            body.replaceChildren(errorBox(e.message));
          }
          refreshHistory();
        });
        actions.append(stop);
      } else if (r.answers) {
        const open = el("button", { type: "button", class: "link", "data-open": r.runId }, "Show answers");
        open.addEventListener("click", async () => {
          const cols = [];
          for (const [provider, sealed] of Object.entries(r.answers)) {
            let text;
            try {
              text = new TextDecoder().decode(await openRunAnswer(r.runId, provider, sealed));
            } catch (e) {
              text = `(cannot open: ${e.message})`;
            }
            const answer = el("div", { class: "answer" });
            showAnswer(answer, text || "(no answer)");
            cols.push(el("section", { class: "card column" }, el("h2", {}, NAMES[provider] || provider, " ", copyButton("Copy", text || "")), answer));
          }
          body.replaceChildren(...cols);
        });
        actions.append(open);
      }
      // Each CLI's changes to the run's code, opened here on demand.
      const changes = (r.diffs || []).map((provider) => {
        const b = changesButton(r.runId, provider);
        b.prepend(el("span", { class: "small" }, `${NAMES[provider] || provider}'s changes: `));
        return b;
      });
      const short = prompt.length > 200 ? `${prompt.slice(0, 200)}…` : prompt;
      const row = el("li", { class: "run-row", "data-run": r.runId },
        prompt ? el("p", { class: "run-prompt" }, short) : null,
        el("span", { class: "muted small" }, `${when} — ${r.state} — ${states} `), actions, body, ...changes);
      return { row, text: `${prompt} ${states} ${r.state}`.toLowerCase() };
    }));
    history.replaceChildren(el("section", { class: "card" }, el("h2", {}, "Your runs"), search, shown,
      el("ul", { class: "runs" }, ...entries.map((e) => e.row))));
    filter();
  }
  refreshHistory();

  view.replaceChildren(form, columns, history);
  return () => { gone = true; if (source) source.close(); };
}
