// Sign up, log out and log in again through the real web UI in headless
// Chromium, against the real binary.

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

test("a new user signs up, logs out and logs in through the page", async () => {
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(15_000);
  const consoleErrors = [];
  const failed = [];
  page.on("response", (r) => { if (r.status() >= 400) failed.push(`${r.status()} ${new URL(r.url()).pathname}`); });
  page.on("console", (m) => { if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  // Signed out, the home page sends you to log in.
  await page.goto(server.base + "/");
  await page.waitForURL("**/login");
  await page.click("text=Create an account");
  await page.waitForURL("**/signup");

  // A too-short password is refused by the server with its message.
  await page.fill("#email", "ada@example.com");
  await page.fill("#password", "short");
  await page.click("button[type=submit]");
  await page.locator(".error").waitFor();
  assert.match(await page.locator(".error").innerText(), /at least 8 characters/);

  await page.fill("#password", "correct horse battery");
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  assert.equal(await page.locator("#welcome").innerText(), "Signed in as ada@example.com.");
  await page.screenshot({ path: artifactPath("home.png") });

  // The session is an HttpOnly cookie: present, but invisible to scripts.
  const cookies = await page.context().cookies();
  const session = cookies.find((c) => c.name === "polydev_session");
  assert.ok(session && session.httpOnly && session.sameSite === "Strict");
  assert.equal(await page.evaluate(() => document.cookie.includes("polydev_session")), false);

  await page.click("#logout");
  await page.waitForURL("**/login");
  await page.goto(server.base + "/");
  await page.waitForURL("**/login");

  // A wrong password shows the server's message; the right one signs in.
  await page.fill("#email", "ada@example.com");
  await page.fill("#password", "wrong horse battery");
  await page.click("button[type=submit]");
  await page.locator(".error").waitFor();
  assert.match(await page.locator(".error").innerText(), /email or password is wrong/);
  await page.fill("#password", "correct horse battery");
  await page.click("button[type=submit]");
  await page.locator("#welcome").waitFor();
  assert.equal(await page.locator("#welcome").innerText(), "Signed in as ada@example.com.");

  // A normal user has no admin link.
  assert.equal(await page.locator("nav >> text=Users").count(), 0);
  // The only failed requests are the deliberate ones above; no script errors.
  assert.deepEqual(failed, ["401 /api/me", "400 /api/users", "401 /api/me", "401 /api/auth/login"]);
  assert.deepEqual(consoleErrors, []);
});
