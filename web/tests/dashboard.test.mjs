// The admin dashboard in headless Chromium: sections, threshold colours
// driven by the test-only host-override file, the warning banner, history
// charts, and the error state when the backend goes away.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startServer, startBrowser, artifactPath, logIn } from "./harness.mjs";

let server;
let chrome;
let overrideDir;
let overrides;

before(async () => {
  overrideDir = mkdtempSync(join(tmpdir(), "polydev-host-"));
  overrides = join(overrideDir, "host.json");
  writeFileSync(overrides, JSON.stringify({ cpu: 50, memory: 80, disk: 95 }));
  server = await startServer(["--health-override-file", overrides, "--health-interval-ms", "200"]);
  server.addUser("root@example.com", "admin password 1", { admin: true });
  server.addUser("ada@example.com", "user password 1");
  chrome = await startBrowser();
});

after(async () => {
  await chrome?.stop();
  await server?.stop();
  rmSync(overrideDir, { recursive: true, force: true });
});

test("a normal user gets no dashboard", async () => {
  const page = await chrome.browser.newPage();
  page.setDefaultTimeout(15_000);
  await logIn(page, server.base, "ada@example.com", "user password 1");
  assert.equal(await page.locator("nav >> text=Host health").count(), 0);
  // Navigate inside the app (a full reload would lock the vault first).
  await page.evaluate(() => {
    history.pushState({}, "", "/admin/health");
    dispatchEvent(new PopStateEvent("popstate"));
  });
  await page.locator(".error").waitFor();
  assert.equal(await page.locator(".error").innerText(), "This page is for admins.");
  await page.close();
});

const levelOf = (page, id) => page.locator(`#${id}`).getAttribute("data-level");

test("an admin sees host health coloured by thresholds, a banner above 90 %, and an error when the API fails", async () => {
  const page = await chrome.browser.newPage({ viewport: { width: 1280, height: 1400 } });
  page.setDefaultTimeout(15_000);
  const scriptErrors = [];
  page.on("pageerror", (e) => scriptErrors.push(String(e)));
  await logIn(page, server.base, "root@example.com", "admin password 1");
  await page.click("nav >> text=Host health");
  await page.waitForURL("**/admin/health");

  await page.locator("#cpu-bar").waitFor();
  for (const section of ["CPU", "Memory", "Disks", "Host", "Interfaces", "Alerts", "History"]) {
    assert.equal(await page.locator(`h2:text-is("${section}")`).count(), 1, section);
  }
  assert.equal(await levelOf(page, "cpu-bar"), "ok");
  assert.equal(await levelOf(page, "memory-bar"), "warn");
  assert.equal(await levelOf(page, "disk-bar-0"), "crit");
  assert.equal(await page.locator("#health-warning").count(), 0, "no banner below 90 %");
  assert.match(await page.locator("#cpu-bar").innerText(), /50\.0 %/);
  // The bar's colour is the threshold colour, not just a class name.
  const red = await page.locator("#disk-bar-0 .fill").evaluate((e) => getComputedStyle(e).backgroundColor);
  assert.equal(red, "rgb(200, 38, 27)");
  // History charts are drawn by the chart library.
  await page.locator("#chart-cpu canvas").waitFor();
  assert.equal(await page.locator(".charts canvas").count(), 4);

  // CPU crosses 90 %: the next 5 s poll turns it red and raises the banner.
  writeFileSync(overrides, JSON.stringify({ cpu: 96, memory: 40, disk: 10 }));
  await page.locator("#health-warning").waitFor({ timeout: 12_000 });
  assert.match(await page.locator("#health-warning").innerText(), /CPU at 96\.0 %/);
  assert.equal(await levelOf(page, "cpu-bar"), "crit");
  assert.equal(await levelOf(page, "memory-bar"), "ok");
  await page.screenshot({ path: artifactPath("dashboard.png"), fullPage: true });

  // The backend dies: the page says so instead of going blank.
  await server.kill();
  await page.locator("#health-error").waitFor({ timeout: 12_000 });
  assert.match(await page.locator("#health-error").innerText(), /Cannot load host health: cannot reach the polydev server/);
  assert.equal(await page.locator("#cpu-bar").count(), 1, "the last reading stays visible");
  await page.screenshot({ path: artifactPath("dashboard-error.png"), fullPage: true });
  assert.deepEqual(scriptErrors, []);
});
