// Drives the run page (web/public/runs.js) in headless Chromium for a Rust
// test (crates/polydev/tests/it/clis.rs): reads {config, prompt, key} on
// stdin, starts the real server with that config, signs in, runs the
// prompt on all three providers and prints what each column shows.
// Not a node:test file; the Rust test owns the assertions.

import { startServer, startBrowser, logIn, artifactPath, readInput } from "./harness.mjs";

const input = await readInput();

const server = await startServer(["--config", input.config], { sandboxes: true });
const chrome = await startBrowser();
const out = { answers: {}, states: {}, endedAt: {} };
try {
  server.addUser("runner@example.com", "correct horse battery");
  const page = await chrome.browser.newPage();
  await logIn(page, server.base, "runner@example.com", "correct horse battery");
  await page.click("a[href='/runs']");
  await page.fill("#prompt", input.prompt);
  for (const p of ["claude_code", "codex", "gemini_cli"]) await page.fill(`#key-${p}`, input.key);
  const t0 = Date.now();
  await page.click("#run");
  // Each column, whenever it ends (in whatever order).
  await Promise.all(["claude_code", "codex", "gemini_cli"].map(async (p) => {
    await page.locator(`#state-${p}`).filter({ hasText: /^(done|failed|timed out)$/ }).waitFor({ timeout: 90_000 });
    out.endedAt[p] = Date.now() - t0;
    out.states[p] = await page.textContent(`#state-${p}`);
    out.answers[p] = await page.textContent(`#answer-${p}`);
  }));
  // The run's end reached the page: the Run button is back, and the run is
  // in the history, whose answers open here.
  await page.locator("#run:not([disabled])").waitFor({ timeout: 30_000 });
  await page.locator("#history li.run-row").first().waitFor({ timeout: 30_000 });
  out.history = await page.textContent("#history");
  await page.click("#history li.run-row >> nth=0 >> button[data-open]");
  await page.locator("#history li.run-row >> nth=0 >> .answer").first().waitFor({ timeout: 10_000 });
  out.opened = await page.textContent("#history li.run-row >> nth=0");
  // The prompt, opened in the tab, and the search over the history.
  out.historyPrompt = await page.textContent("#history li.run-row >> nth=0 >> .run-prompt");
  await page.fill("#history-search", "zzz-no-such-run");
  out.searchNone = { count: await page.textContent("#history-count"), visible: await page.locator("#history li.run-row:visible").count() };
  await page.fill("#history-search", input.prompt.split(" ")[1]);
  out.searchHit = { count: await page.textContent("#history-count"), visible: await page.locator("#history li.run-row:visible").count() };
  await page.screenshot({ path: artifactPath("run-page.png"), fullPage: true });
  out.logs = server.logs.join("\n");
} finally {
  await chrome.stop();
  await server.stop();
}
process.stdout.write(JSON.stringify(out));
