// Drives the run page (web/public/runs.js) in headless Chromium for a Rust
// test (crates/polydev/tests/it/clis.rs): reads {config, prompt, key} on
// stdin, starts the real server with that config, signs in, runs the
// prompt on all three providers and prints what each column shows.
// Not a node:test file; the Rust test owns the assertions.

import { startServer, startBrowser, logIn, artifactPath } from "./harness.mjs";

const input = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (c) => (data += c));
  process.stdin.on("end", () => resolve(data));
}));

const server = await startServer(["--config", input.config], { sandboxes: true });
const chrome = await startBrowser();
const out = { answers: {}, states: {} };
try {
  server.addUser("runner@example.com", "correct horse battery");
  const page = await chrome.browser.newPage();
  await logIn(page, server.base, "runner@example.com", "correct horse battery");
  await page.click("a[href='/runs']");
  await page.fill("#prompt", input.prompt);
  for (const p of ["claude_code", "codex", "gemini_cli"]) await page.fill(`#key-${p}`, input.key);
  await page.click("#run");
  for (const p of ["claude_code", "codex", "gemini_cli"]) {
    await page.locator(`#state-${p}`).filter({ hasText: /done|failed/ }).waitFor({ timeout: 90_000 });
    out.states[p] = await page.textContent(`#state-${p}`);
    out.answers[p] = await page.textContent(`#answer-${p}`);
  }
  await page.screenshot({ path: artifactPath("run-page.png"), fullPage: true });
  out.logs = server.logs.join("\n");
} finally {
  await chrome.stop();
  await server.stop();
}
process.stdout.write(JSON.stringify(out));
