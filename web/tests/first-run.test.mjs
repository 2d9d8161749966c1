// A first-time user's home page in headless Chromium says how far they
// are on the way to a first answer: the vault done, no CLI connected yet
// (with the way this installation recommends), then one connected after
// saving a key on the Providers page.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startServer, startBrowser, artifactPath } from "./harness.mjs";

let server;
let chrome;

before(async () => {
  server = await startServer();
  chrome = await startBrowser();
});

after(async () => {
  await chrome?.stop();
  await server?.stop();
});

test("the home page walks a new user to a first run", async () => {
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(15_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(server.base + "/signup");
  await page.fill("#email", "newcomer@example.com");
  await page.fill("#password", "correct horse battery");
  await page.check("#acknowledge");
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  await page.locator("#step-connect").waitFor();
  const state = async () => ({
    vault: await page.getAttribute("#step-vault", "data-done"),
    connect: await page.getAttribute("#step-connect", "data-done"),
    connectText: await page.textContent("#step-connect"),
    run: await page.getAttribute("#step-run", "data-done"),
  });
  const before = await state();
  await page.screenshot({ path: artifactPath("first-run.png"), fullPage: true });
  assert.deepEqual([before.vault, before.connect, before.run], ["true", "false", "false"]);
  assert.match(await page.textContent("#step-run"), /Ask your first question/);
  // No sign-in runs here (no sandboxes): an API key is the way.
  assert.match(before.connectText, /Connect a CLI\. Save an API key, e\.g\. Anthropic API key for Claude Code/);
  await page.click("#step-connect a[href='/providers']");
  await page.waitForURL("**/providers");
  await page.fill("#apikey-codex", "sk-first-run-key");
  await page.click("#save-key-codex");
  await page.locator("#provider-state-codex", { hasText: "API key saved" }).waitFor();
  await page.click("a[href='/']");
  await page.locator("#step-connect[data-done=true]").waitFor();
  const after = await state();
  assert.match(after.connectText, /1 of 5 CLIs connected/);
  assert.equal(after.run, "false");
  assert.deepEqual(errors, []);
});
