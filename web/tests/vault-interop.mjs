// Runs the vault's browser module (web/public/vault.js) in headless
// Chromium for a Rust test (crates/polydev/tests/it/vault_browser.rs):
// reads a JSON request on stdin, prints a JSON answer on stdout.
// Not a node:test file; the Rust test owns the assertions.

import { startServer, startBrowser, readInput } from "./harness.mjs";

const input = await readInput();

const server = await startServer();
const chrome = await startBrowser();
try {
  const page = await chrome.browser.newPage();
  await page.goto(server.base + "/favicon.svg");
  const answer = await page.evaluate(async (req) => {
    const v = await import("/vault.js");
    const { CipherSuite, DhkemP256HkdfSha256, HkdfSha256, Aes128Gcm, Aes256Gcm } = await import("/vendor/hpke.js");
    const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    const bytes = (h) => Uint8Array.from(h.match(/../g) || [], (x) => parseInt(x, 16));
    const enc = new TextEncoder();
    const out = { kat: {}, opened: {}, errors: {}, made: {}, bench: {} };

    // Known answers: RFC 5869 test case 1 (HKDF-SHA256) through Web Crypto.
    const ikm = await crypto.subtle.importKey("raw", new Uint8Array(22).fill(0x0b), "HKDF", false, ["deriveBits"]);
    out.kat.rfc5869 = hex(new Uint8Array(await crypto.subtle.deriveBits(
      { name: "HKDF", hash: "SHA-256", salt: bytes("000102030405060708090a0b0c"), info: bytes("f0f1f2f3f4f5f6f7f8f9") }, ikm, 42 * 8)));
    // RFC 9180 A.3.1 (P-256, HKDF-SHA256, AES-128-GCM) through @hpke/core.
    const suite128 = new CipherSuite({ kem: new DhkemP256HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes128Gcm() });
    const r = await suite128.kem.deriveKeyPair(bytes("668b37171f1072f3cf12ea8a236a45df23fc13b82af3609ad1e354f6ef817550").buffer);
    out.kat.rfc9180_skRm = hex(new Uint8Array(await suite128.kem.serializePrivateKey(r.privateKey)));
    out.kat.rfc9180_pkRm = hex(new Uint8Array(await suite128.kem.serializePublicKey(r.publicKey)));
    out.kat.rfc9180_pt = hex(new Uint8Array(await suite128.open(
      { recipientKey: r.privateKey, enc: bytes("04a92719c6195d5085104f469a8b9814d5838ff72b60501e2c4466e5e67b325ac98536d7b61a1af4b78e5b7f951c0900be863c403ce65c9bfcb9382657222d18c4"), info: bytes("4f6465206f6e2061204772656369616e2055726e") },
      bytes("5ad590bb8baa577f8619db35a36311226a896e7342a6d836d8b7bcd2f20b6c7f9076ac232e3ab2523f39513434"), bytes("436f756e742d30"))));
    // The frozen HKDF split (same value as the Rust unit test).
    const fixed = await v.split(new Uint8Array(32).fill(0x42));
    out.kat.split_wrapping = hex(fixed.wrappingKey);
    out.kat.split_login = hex(fixed.loginCredential);

    // The same password and salt give the same keys as in Rust.
    const master = await v.deriveMasterKey(req.password, 600000, bytes(req.salt));
    const { wrappingKey, loginCredential } = await v.split(master);
    out.made.loginCredential = hex(loginCredential);

    // Open what Rust made: its wrapped vault key, an item, a sealed box.
    const rustVaultKey = await v.unwrapVaultKey(wrappingKey, req.userId, bytes(req.rust.wrappedVaultKey));
    out.opened.item = new TextDecoder().decode(await v.openItem(rustVaultKey, req.rust.ctx, bytes(req.rust.item)));
    const suite256 = new CipherSuite({ kem: new DhkemP256HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes256Gcm() });
    const derived = await suite256.kem.deriveKeyPair(bytes(req.rust.sealingIkm).buffer);
    const sk = new Uint8Array(await suite256.kem.serializePrivateKey(derived.privateKey));
    out.opened.sealingPublicKey = hex(new Uint8Array(await suite256.kem.serializePublicKey(derived.publicKey)));
    out.opened.sealed = new TextDecoder().decode(await v.open(sk, req.rust.purpose, enc.encode(req.rust.aad), bytes(req.rust.sealed)));

    // Refusals, by code.
    const code = async (f) => { try { await f(); return "opened"; } catch (e) { return e.code || String(e); } };
    const item = bytes(req.rust.item);
    const flip = (b, i) => { const c = b.slice(); c[i] ^= 1; return c; };
    out.errors.tampered = await code(() => v.openItem(rustVaultKey, req.rust.ctx, flip(item, item.length - 1)));
    out.errors.otherVersion = await code(() => v.openItem(rustVaultKey, { ...req.rust.ctx, version: req.rust.ctx.version + 1 }, item));
    out.errors.truncated = await code(() => v.openItem(rustVaultKey, req.rust.ctx, item.subarray(0, 20)));
    const newer = item.slice(); newer[1] = 2;
    out.errors.newer = await code(() => v.openItem(rustVaultKey, req.rust.ctx, newer));
    const older = item.slice(); older[1] = 0;
    out.errors.downgrade = await code(() => v.openItem(rustVaultKey, req.rust.ctx, older));
    out.errors.wrongPurpose = await code(() => v.open(sk, "other-purpose", enc.encode(req.rust.aad), bytes(req.rust.sealed)));
    out.errors.weakKdf = await code(() => v.deriveMasterKey(req.password, 1000, bytes(req.salt)));

    // Make things for Rust to open: a wrapped vault key, an item, a sealed box.
    const browserVaultKey = crypto.getRandomValues(new Uint8Array(32));
    out.made.wrappedVaultKey = hex(await v.wrapVaultKey(wrappingKey, req.userId, browserVaultKey));
    out.made.item = hex(await v.sealItem(browserVaultKey, req.browserCtx, enc.encode(req.browserPlaintext)));
    out.made.sealed = hex(await v.seal(bytes(req.rust.userPublicKey), req.rust.purpose, enc.encode(req.rust.aad), enc.encode(req.browserPlaintext)));

    if (req.bench) {
      let t = performance.now();
      await v.deriveMasterKey(req.password, 600000, bytes(req.salt));
      out.bench.kdf_ms = performance.now() - t;
      const mib = crypto.getRandomValues(new Uint8Array(65536));
      const big = new Uint8Array(16 << 20);
      for (let i = 0; i < big.length; i += mib.length) big.set(mib, i);
      t = performance.now();
      const sealed = await v.sealItem(browserVaultKey, req.browserCtx, big);
      out.bench.seal_mb_s = big.length / 1e6 / ((performance.now() - t) / 1000);
      t = performance.now();
      await v.openItem(browserVaultKey, req.browserCtx, sealed);
      out.bench.open_mb_s = big.length / 1e6 / ((performance.now() - t) / 1000);
    }
    v.wipe(master, wrappingKey, loginCredential, rustVaultKey, browserVaultKey, sk);
    return out;
  }, input);
  process.stdout.write(JSON.stringify(answer) + "\n");
} finally {
  await chrome.stop();
  await server.stop();
}
