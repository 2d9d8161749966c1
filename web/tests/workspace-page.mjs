// Drives the run page with code (web/public/runs.js, workspace.js) in
// headless Chromium for a Rust test (crates/polydev/tests/it/workspaces.rs):
// reads {config, imagesDir, key, dir} on stdin, starts the real server on
// the images users get (the `runtime` image the first start built), signs in,
// picks the folder `dir` as the run's code in edit mode, runs the three
// CLIs, opens each one's changes and prints what the page showed and the
// patch each download link gives. The Rust test owns the assertions.

import { readFileSync } from "node:fs";
import { startServer, startBrowser, logIn, artifactPath, readInput } from "./harness.mjs";

const input = await readInput();
const PROVIDERS = ["claude_code", "codex", "gemini_cli"];

const server = await startServer(["--config", input.config, "--images-dir", input.imagesDir], { sandboxes: true });
const chrome = await startBrowser();
const out = { states: {}, changes: {}, patches: {} };
try {
  server.addUser("coder@example.com", "correct horse battery");
  const page = await chrome.browser.newPage();
  await logIn(page, server.base, "coder@example.com", "correct horse battery");
  await page.click("a[href='/runs']");
  await page.fill("#prompt", "fix the bug");
  for (const p of PROVIDERS) await page.fill(`#key-${p}`, input.key);
  await page.click("#workspace summary");
  await page.setInputFiles("#workspace-files", input.dir);
  await page.locator("#workspace-picked").filter({ hasText: /files/ }).waitFor({ timeout: 10_000 });
  out.picked = await page.textContent("#workspace-picked");
  await page.selectOption("#workspace-mode", "edit");
  await page.click("#run");
  await Promise.all(PROVIDERS.map(async (p) => {
    await page.locator(`#state-${p}`).filter({ hasText: /^(done|failed|timed out)$/ }).waitFor({ timeout: 90_000 });
    out.states[p] = await page.textContent(`#state-${p}`);
  }));
  for (const p of PROVIDERS) {
    const button = page.locator(`#changes-${p} button[data-diff]`);
    await button.waitFor({ timeout: 10_000 });
    await button.click();
    await page.locator(`#changes-${p} .diff-view`).waitFor({ timeout: 10_000 });
    await page.click(`#changes-${p} .diff-file summary >> nth=0`);
    out.changes[p] = await page.textContent(`#changes-${p}`);
    // What the download link gives (a blob made in the tab), downloaded
    // as a user's click downloads it.
    const [download] = await Promise.all([
      page.waitForEvent("download", { timeout: 10_000 }),
      page.click(`#changes-${p} a.download-patch`),
    ]);
    out.patches[p] = readFileSync(await download.path(), "utf8");
    out.names = { ...(out.names || {}), [p]: download.suggestedFilename() };
  }
  await page.screenshot({ path: artifactPath("workspace-page.png"), fullPage: true });
  // The run's changes open from the history below as well.
  await page.locator("#history li.run-row").first().waitFor({ timeout: 30_000 });
  const fromHistory = page.locator("#history li.run-row >> nth=0 >> button[data-diff='codex']");
  await fromHistory.click();
  await page.locator("#history li.run-row >> nth=0 >> .diff-view").waitFor({ timeout: 10_000 });
  out.history = await page.textContent("#history li.run-row >> nth=0");
  out.logs = server.logs.join("\n");
} finally {
  await chrome.stop();
  await server.stop();
}
process.stdout.write(JSON.stringify(out));
