// Drives the Providers and Runs pages in headless Chromium for a Rust test
// (crates/polydev/tests/it/clis.rs): reads {config, key} on stdin, starts
// the real server with that config, signs up (a vault), saves `key` as
// Claude Code's cloud key (Amazon Bedrock) on the Providers page, then runs
// a prompt on Claude Code from the Runs page with nothing typed, and prints
// what the pages showed. Not a node:test file; the Rust test asserts.

import { startServer, startBrowser, artifactPath, readInput } from "./harness.mjs";

const input = await readInput();

const server = await startServer(["--config", input.config], { sandboxes: true });
const chrome = await startBrowser();
const out = {};
try {
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(30_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(server.base + "/signup");
  await page.fill("#email", "cloud-page@example.com");
  await page.fill("#password", "correct horse battery");
  await page.check("#acknowledge");
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  await page.click("a[href='/providers']");
  await page.locator("#cloud-claude_code").waitFor();
  out.hint = await page.textContent("#cloud-hint-claude_code");
  out.codexHasCloud = await page.locator("#cloud-codex").count();
  await page.fill("#cloud-claude_code", input.key);
  await page.click("#save-cloud-claude_code");
  await page.locator("#provider-state-claude_code", { hasText: "cloud key saved" }).waitFor();
  await page.click("a[href='/runs']");
  await page.locator("#use-claude_code:checked").waitFor();
  out.placeholder = await page.getAttribute("#key-claude_code", "placeholder");
  for (const p of ["codex", "gemini_cli", "opencode", "copilot"]) {
    if (await page.isChecked(`#use-${p}`)) await page.uncheck(`#use-${p}`);
  }
  await page.fill("#prompt", "hello from the page");
  await page.click("#run");
  await page.locator("#state-claude_code").filter({ hasText: /^(done|failed|timed out)$/ }).waitFor({ timeout: 90_000 });
  out.state = await page.textContent("#state-claude_code");
  out.answer = await page.textContent("#answer-claude_code");
  await page.screenshot({ path: artifactPath("cloud-key.png"), fullPage: true });
  out.errors = errors;
  out.logs = server.logs.join("\n");
} finally {
  await chrome.stop();
  await server.stop();
}
process.stdout.write(JSON.stringify(out));
