// The vault's client side, byte for byte the formats of crates/polydev-vault
// (docs/VAULT.md): password → master key (PBKDF2-SHA256, Web Crypto) → HKDF
// split into a wrapping key and a login credential; AES-256-GCM envelopes
// bound to user, item and version; HPKE sealing (DHKEM P-256, HKDF-SHA256,
// AES-256-GCM) through @hpke/core. Keys are raw Uint8Arrays the caller
// wipes (`wipe`) when the vault locks.

import { CipherSuite, DhkemP256HkdfSha256, HkdfSha256, Aes256Gcm } from "/vendor/hpke.js";

export const MAGIC = 0x50;
export const FORMAT_VERSION = 1;
const OLDEST_ACCEPTED = 1;
export const KIND = { item: 1, vaultKey: 2, sealingKey: 3, sealed: 4 };
export const MIN_PBKDF2_ITERATIONS = 600000;
const enc = new TextEncoder();

export class VaultError extends Error {
  // code: truncated | not_an_envelope | unsupported_version | downgrade |
  //       wrong_kind | undecryptable | weak_kdf | bad_key
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export function wipe(...arrays) {
  for (const a of arrays) if (a) a.fill(0);
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function u32be(n) {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}

function u64be(n) {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n));
  return b;
}

export async function deriveMasterKey(password, iterations, salt) {
  if (iterations < MIN_PBKDF2_ITERATIONS) {
    throw new VaultError("weak_kdf", `PBKDF2 with ${iterations} iterations (minimum ${MIN_PBKDF2_ITERATIONS})`);
  }
  const base = await crypto.subtle.importKey("raw", enc.encode(password), "PBKDF2", false, ["deriveBits"]);
  const bits = await crypto.subtle.deriveBits({ name: "PBKDF2", hash: "SHA-256", salt, iterations }, base, 256);
  return new Uint8Array(bits);
}

async function hkdf32(ikm, info) {
  const key = await crypto.subtle.importKey("raw", ikm, "HKDF", false, ["deriveBits"]);
  // An empty salt is HMAC with a zero key, as RFC 5869's "not provided".
  const bits = await crypto.subtle.deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: new Uint8Array(0), info: enc.encode(info) }, key, 256);
  return new Uint8Array(bits);
}

export async function split(masterKey) {
  return {
    wrappingKey: await hkdf32(masterKey, "polydev vault v1 key-wrapping"),
    loginCredential: await hkdf32(masterKey, "polydev vault v1 login"),
  };
}

export function aad(kind, { userId, itemId, version }) {
  const user = enc.encode(userId);
  const item = enc.encode(itemId);
  return concat(enc.encode("polydev-vault"), new Uint8Array([FORMAT_VERSION, kind]),
    u32be(user.length), user, u32be(item.length), item, u64be(version));
}

function checkHeader(data, kind, minLen) {
  if (data.length < 3) throw new VaultError("truncated", "data is too short to be a vault envelope");
  if (data[0] !== MAGIC) throw new VaultError("not_an_envelope", "data is not a polydev vault envelope");
  if (data[1] > FORMAT_VERSION) throw new VaultError("unsupported_version", `envelope version ${data[1]} is newer than this client`);
  if (data[1] < OLDEST_ACCEPTED) throw new VaultError("downgrade", `envelope version ${data[1]} is older than the oldest accepted`);
  if (data[2] !== kind) throw new VaultError("wrong_kind", `envelope holds kind ${data[2]}, expected ${kind}`);
  if (data.length < minLen) throw new VaultError("truncated", "data is too short to be a vault envelope");
  return data.subarray(3);
}

export async function sealEnvelope(keyBytes, kind, ctx, plaintext, nonce = crypto.getRandomValues(new Uint8Array(12))) {
  const key = await crypto.subtle.importKey("raw", keyBytes, "AES-GCM", false, ["encrypt"]);
  const ct = await crypto.subtle.encrypt({ name: "AES-GCM", iv: nonce, additionalData: aad(kind, ctx) }, key, plaintext);
  return concat(new Uint8Array([MAGIC, FORMAT_VERSION, kind]), nonce, new Uint8Array(ct));
}

export async function openEnvelope(keyBytes, kind, ctx, data) {
  const body = checkHeader(data, kind, 3 + 12 + 16);
  const key = await crypto.subtle.importKey("raw", keyBytes, "AES-GCM", false, ["decrypt"]);
  try {
    const pt = await crypto.subtle.decrypt(
      { name: "AES-GCM", iv: body.subarray(0, 12), additionalData: aad(kind, ctx) }, key, body.subarray(12));
    return new Uint8Array(pt);
  } catch {
    throw new VaultError("undecryptable", "cannot decrypt: wrong key, or the data or its context was altered");
  }
}

export const sealItem = (vaultKey, ctx, plaintext) => sealEnvelope(vaultKey, KIND.item, ctx, plaintext);
export const openItem = (vaultKey, ctx, data) => openEnvelope(vaultKey, KIND.item, ctx, data);
export const wrapVaultKey = (wrappingKey, userId, vaultKey) =>
  sealEnvelope(wrappingKey, KIND.vaultKey, { userId, itemId: "vault-key", version: 0 }, vaultKey);
export const unwrapVaultKey = (wrappingKey, userId, wrapped) =>
  openEnvelope(wrappingKey, KIND.vaultKey, { userId, itemId: "vault-key", version: 0 }, wrapped);

const suite = new CipherSuite({ kem: new DhkemP256HkdfSha256(), kdf: new HkdfSha256(), aead: new Aes256Gcm() });
const sealInfo = (purpose) => enc.encode(`polydev seal v1 ${purpose}`);

/// A fresh sealing key pair as raw bytes: { privateKey (32), publicKey (65) }.
export async function generateSealingKeyPair() {
  const pair = await suite.kem.generateKeyPair();
  return {
    privateKey: new Uint8Array(await suite.kem.serializePrivateKey(pair.privateKey)),
    publicKey: new Uint8Array(await suite.kem.serializePublicKey(pair.publicKey)),
  };
}

export async function seal(publicKey, purpose, aadBytes, plaintext) {
  let recipientPublicKey;
  try {
    recipientPublicKey = await suite.kem.deserializePublicKey(publicKey);
  } catch {
    throw new VaultError("bad_key", "not a valid P-256 key");
  }
  const { enc: encapped, ct } = await suite.seal({ recipientPublicKey, info: sealInfo(purpose) }, plaintext, aadBytes);
  return concat(new Uint8Array([MAGIC, FORMAT_VERSION, KIND.sealed]), new Uint8Array(encapped), new Uint8Array(ct));
}

export async function open(privateKey, purpose, aadBytes, sealed) {
  const body = checkHeader(sealed, KIND.sealed, 3 + 65 + 16);
  try {
    const recipientKey = await suite.kem.deserializePrivateKey(privateKey);
    const pt = await suite.open(
      { recipientKey, enc: body.subarray(0, 65), info: sealInfo(purpose) }, body.subarray(65), aadBytes);
    return new Uint8Array(pt);
  } catch {
    throw new VaultError("undecryptable", "cannot decrypt: wrong key, or the data or its context was altered");
  }
}
