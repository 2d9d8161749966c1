// The admin's Sandboxes page in headless Chromium, on a server with real
// sandboxes: each template's image and why one is not there (missing, or
// a failed preparation with the build's error), the pools, and the live
// sandboxes, one of which the admin ends from the page. A plain user is
// told the page is for admins.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { startServer, startBrowser, logIn, artifactPath } from "./harness.mjs";

let server;
let chrome;

before(async () => {
  // Warm pools of runtime=2 (its image missing: none become ready).
  server = await startServer(["--sandbox-pools", "runtime=2"], { sandboxes: true });
  chrome = await startBrowser();
  server.addUser("root@example.com", "admin password 1", { admin: true });
  server.addUser("plain@example.com", "plain password 1");
});

after(async () => {
  await chrome?.stop();
  await server?.stop();
});

test("an admin sees images, pools and live sandboxes, and ends one", async () => {
  // A preparation of `browser` that failed (as a controller leaves it).
  const images = join(server.dataDir, "images");
  mkdirSync(images, { recursive: true });
  writeFileSync(join(images, ".prepare.json"), JSON.stringify({
    browser: { state: "failed", error: "apt-get install in the image exited 100: canary mirror error", atMs: Date.now() - 120_000 },
  }));
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(15_000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await logIn(page, server.base, "root@example.com", "admin password 1");
  const made = await page.evaluate(async () => {
    const r = await fetch("/api/sandboxes", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ template: "minimal" }) });
    return { status: r.status, body: await r.json() };
  });
  assert.equal(made.status, 201, JSON.stringify(made.body));
  await page.click("a[href='/admin/sandboxes']");
  await page.locator(`#live tr[data-id='${made.body.id}']`).waitFor();
  assert.equal(await page.getAttribute("#images tr[data-template=minimal]", "data-state"), "ready");
  assert.match(await page.textContent("#images tr[data-template=runtime]"), /missing: `polydev image build`/);
  assert.match(await page.textContent("#images tr[data-template=browser]"), /failed 2 min ago: apt-get install in the image exited 100: canary mirror error/);
  assert.match(await page.textContent("#capacity"), /^1 of at most \d+ on this host\.$/);
  assert.match(await page.textContent("#pools"), /runtime\s*0\s*2/);
  await page.screenshot({ path: artifactPath("sandboxes.png"), fullPage: true });
  await page.click(`button[data-end='${made.body.id}']`);
  await page.locator(`#live tr[data-id='${made.body.id}']`).waitFor({ state: "detached" });
  const after = await page.evaluate(async (id) => (await (await fetch(`/api/sandboxes/${id}`)).json()).status, made.body.id);
  assert.equal(after, "ended");
  assert.deepEqual(errors, []);
  await page.close();
});

test("a plain user is told the page is for admins", async () => {
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(15_000);
  await logIn(page, server.base, "plain@example.com", "plain password 1");
  assert.equal(await page.locator("a[href='/admin/sandboxes']").count(), 0);
  // In-app navigation (a reload would lock the vault first).
  await page.evaluate(() => { history.pushState({}, "", "/admin/sandboxes"); dispatchEvent(new PopStateEvent("popstate")); });
  await page.locator("[role=alert]", { hasText: "This page is for admins." }).waitFor();
  const r = await page.evaluate(async () => (await fetch("/api/admin/environment")).status);
  assert.equal(r, 403);
  await page.close();
});
