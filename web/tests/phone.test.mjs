// Every page at a phone's width (390 px) in headless Chromium: nothing is
// wider than the screen, the header's links and Log out are on it and can
// be tapped (as an admin, who has the most links in the header).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { startServer, startBrowser, artifactPath, logIn } from "./harness.mjs";

let server;
let chrome;

before(async () => {
  server = await startServer();
  server.addUser("root@example.com", "admin password 1", { admin: true });
  chrome = await startBrowser();
});

after(async () => {
  await chrome?.stop();
  await server?.stop();
});

/// What overflows the screen on the page now shown, and whether each
/// header control lies fully on it.
async function layout(page) {
  return page.evaluate(() => {
    const width = document.documentElement.clientWidth;
    const wide = [...document.querySelectorAll("body *")]
      .filter((e) => e.getBoundingClientRect().right > width + 1 && getComputedStyle(e).position !== "fixed")
      // Inside something that scrolls on its own, it may be wider.
      .filter((e) => !e.closest("table.grid, .log-tail, pre"))
      .map((e) => `${e.tagName.toLowerCase()}#${e.id}.${e.className}`);
    const controls = [...document.querySelectorAll(".bar a, .bar button")].map((e) => {
      const r = e.getBoundingClientRect();
      return { text: e.textContent, on: r.left >= 0 && r.right <= width && r.height > 0 };
    });
    return { width, scroll: document.documentElement.scrollWidth, wide, controls };
  });
}

test("at 390 px no page is wider than the screen and the header stays tappable", async () => {
  const context = await chrome.browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  await logIn(page, server.base, "root@example.com", "admin password 1");
  const pages = ["/", "/runs", "/providers", "/admin/health", "/admin/sandboxes", "/admin/users"];
  for (const path of pages) {
    await page.evaluate((p) => { history.pushState({}, "", p); dispatchEvent(new PopStateEvent("popstate")); }, path);
    await page.waitForLoadState("networkidle");
    await page.waitForTimeout(300);
    const l = await layout(page);
    await page.screenshot({ path: artifactPath(`phone${path.replaceAll("/", "-") || "-home"}.png`), fullPage: true });
    assert.equal(l.width, 390, path);
    assert.ok(l.scroll <= l.width, `${path}: the page is ${l.scroll} px wide: ${l.wide.join(", ")}`);
    assert.deepEqual(l.wide, [], path);
    assert.ok(l.controls.length >= 4, `${path}: ${JSON.stringify(l.controls)}`);
    for (const c of l.controls) assert.ok(c.on, `${path}: "${c.text}" is off the screen`);
  }
  // Log out is reachable with a tap.
  await page.tap("#logout");
  await page.waitForURL("**/login");
  await context.close();
});
