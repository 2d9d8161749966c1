// Sign-up, unlock, auto-lock, log-out and log-in through the real web UI in
// headless Chromium, against the real binary. The password must never
// leave the page.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startServer, startBrowser, artifactPath, logIn } from "./harness.mjs";

const PASSWORD = "correct horse battery";
let server;
let chrome;

before(async () => {
  server = await startServer(["--vault-autolock-secs", "3"]);
  chrome = await startBrowser();
});

after(async () => {
  await chrome?.stop();
  await server?.stop();
});

test("a new user signs up, unlocks after a reload, is auto-locked, logs out and logs in", async () => {
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(15_000);
  const scriptErrors = [];
  const failed = [];
  const bodies = [];
  page.on("pageerror", (e) => scriptErrors.push(String(e)));
  page.on("response", (r) => { if (r.status() >= 400) failed.push(`${r.status()} ${new URL(r.url()).pathname}`); });
  page.on("request", (r) => bodies.push((r.url() + " " + (r.postData() || ""))));

  // Signed out, the home page sends you to log in.
  await page.goto(server.base + "/");
  await page.waitForURL("**/login");
  await page.click("text=Create an account");
  await page.waitForURL("**/signup");
  assert.match(await page.locator(".warning-note").innerText(), /cannot recover my password/);

  // Checked here, before anything is sent.
  await page.fill("#email", "ada@example.com");
  await page.fill("#password", "short");
  await page.click("button[type=submit]");
  await page.locator(".error").waitFor();
  assert.match(await page.locator(".error").innerText(), /at least 8 characters/);
  await page.fill("#password", PASSWORD);
  await page.click("button[type=submit]");
  await page.locator(".error >> text=cannot be recovered").waitFor();

  await page.check("#acknowledge");
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  assert.equal(await page.locator("#welcome").innerText(), "Signed in as ada@example.com.");
  assert.equal(await page.locator("#vault-state").innerText(), "Vault unlocked on this device.");
  assert.equal(await page.title(), "Home · polydev");
  await page.screenshot({ path: artifactPath("home.png") });

  // The session is an HttpOnly cookie: present, but invisible to scripts.
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === "polydev_session");
  assert.ok(session && session.httpOnly && session.sameSite === "Strict");
  assert.equal(await page.evaluate(() => document.cookie.includes("polydev_session")), false);

  // A reload forgets the keys: the vault must be unlocked again.
  await page.reload();
  await page.waitForURL("**/unlock");
  // It says why: the key lives only in this tab.
  assert.match(await page.locator("#why-locked").innerText(), /only in this tab's memory/);
  assert.equal(await page.title(), "Unlock · polydev");
  await page.fill("#password", "wrong horse battery");
  await page.click("button[type=submit]");
  await page.locator(".error").waitFor();
  assert.equal(await page.locator(".error").innerText(), "wrong password");
  await page.fill("#password", PASSWORD);
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();

  // Idle for longer than the configured 3 s: locked, keys gone.
  await page.waitForURL("**/unlock", { timeout: 10_000 });
  await page.screenshot({ path: artifactPath("unlock.png") });
  await page.fill("#password", PASSWORD);
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();

  // With the server unreachable, navigating still changes the page: its
  // heading and why, not the old page under a new address.
  await page.route("**/api/**", (r) => r.abort());
  await page.click("a[href='/providers']");
  await page.locator("h1 >> text=Providers").waitFor();
  await page.locator(".error").waitFor();
  assert.equal(await page.title(), "Providers · polydev");
  await page.unroute("**/api/**");
  await page.click("a[href='/']");
  await page.locator("#welcome").waitFor();

  await page.click("#logout");
  await page.waitForURL("**/login");
  await page.fill("#email", "ada@example.com");
  await page.fill("#password", "wrong horse battery");
  await page.click("button[type=submit]");
  await page.locator(".error").waitFor();
  assert.match(await page.locator(".error").innerText(), /email or password is wrong/);
  await page.fill("#password", PASSWORD);
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  assert.equal(await page.locator("nav >> text=Users").count(), 0, "a normal user has no admin link");

  // Zero knowledge: the password was never in any request.
  assert.equal(bodies.filter((b) => b.includes(PASSWORD) || b.includes("wrong horse battery")).length, 0);
  assert.ok(failed.includes("401 /api/auth/login"), failed.join(", "));
  assert.deepEqual(failed.filter((f) => !f.startsWith("401 ")), []);
  assert.deepEqual(scriptErrors, []);
});

test("a vault item the server hands back older, or relabelled, is refused", async () => {
  server.addUser("rollback@example.com", PASSWORD);
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(15_000);
  await logIn(page, server.base, "rollback@example.com", PASSWORD);
  // Two versions of one item, written (and so seen) by this browser.
  const first = await page.evaluate(async () => {
    const s = await import("/session.js");
    await s.putSecret("apikey.codex", "the old key");
    const v1 = await (await fetch("/api/vault/items/apikey.codex")).json();
    await s.putSecret("apikey.codex", "the new key");
    return v1;
  });
  assert.equal(first.version, 1);
  assert.equal(await page.evaluate(async () => (await import("/session.js")).getSecret("apikey.codex")), "the new key");
  // A server that serves version 1 again: refused, not shown.
  await page.route("**/api/vault/items/apikey.codex", (route) => route.fulfill({ json: first }));
  const rolledBack = await page.evaluate(async () => {
    try {
      return await (await import("/session.js")).getSecret("apikey.codex");
    } catch (e) {
      return `refused: ${e.message}`;
    }
  });
  assert.match(rolledBack, /^refused: .*older than version 2.*rollback/);
  // ...nor can it pass version 1's envelope off as version 2 (the AAD binds it).
  await page.unroute("**/api/vault/items/apikey.codex");
  await page.route("**/api/vault/items/apikey.codex", (route) => route.fulfill({ json: { ...first, version: 2 } }));
  const relabelled = await page.evaluate(async () => {
    try {
      return await (await import("/session.js")).getSecret("apikey.codex");
    } catch (e) {
      return `refused: ${e.message}`;
    }
  });
  assert.match(relabelled, /^refused: /);
  assert.doesNotMatch(relabelled, /the old key/);
  await page.close();
});
