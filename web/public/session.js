// The signed-in user's vault session: keys derived from the password stay
// in this module only while the vault is unlocked, and are wiped (zeroed
// and dropped) when it locks: explicitly, on logout, or after idle time.
// The password itself never leaves the page (docs/VAULT.md).

import { api, ApiError } from "/api.js";
import * as v from "/vault.js";

const b64 = (bytes) => btoa(String.fromCharCode(...bytes));
const unb64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

let keys = null; // { userId, vaultKey, privateKey, publicKey }
let idleTimer = null;
let idleSecs = 900;
let onLock = () => {};

export const isUnlocked = () => keys !== null;

export function lock() {
  if (keys) v.wipe(keys.vaultKey, keys.privateKey);
  keys = null;
  clearTimeout(idleTimer);
  idleTimer = null;
}

function touch() {
  if (!keys) return;
  clearTimeout(idleTimer);
  idleTimer = setTimeout(() => {
    lock();
    onLock();
  }, idleSecs * 1000);
}

/// Locks after the server's configured idle time; `then` runs on auto-lock.
export async function armAutoLock(then) {
  onLock = then;
  try {
    idleSecs = (await api.clientConfig()).vaultAutolockSecs;
  } catch {
    // Keep the default.
  }
  for (const event of ["mousemove", "mousedown", "keydown", "scroll", "touchstart"]) {
    window.addEventListener(event, touch, { passive: true });
  }
}

/// Web Crypto exists only in secure contexts (HTTPS, or localhost).
function needSecureContext() {
  if (!window.isSecureContext || !crypto.subtle) {
    throw new Error("polydev's vault needs HTTPS (or localhost): browsers offer their cryptography only on secure pages");
  }
}

function checkPassword(password) {
  if (password.length < 8) throw new Error("password must be at least 8 characters");
}

async function open(userId, wrappingKey, stored) {
  let vaultKey;
  try {
    vaultKey = await v.unwrapVaultKey(wrappingKey, userId, unb64(stored.wrappedVaultKey));
  } catch (e) {
    throw new Error(e.code === "undecryptable" ? "wrong password" : e.message);
  }
  const privateKey = await v.openEnvelope(vaultKey, v.KIND.sealingKey,
    { userId, itemId: "sealing-key", version: 0 }, unb64(stored.wrappedPrivateKey));
  keys = { userId, vaultKey, privateKey, publicKey: unb64(stored.publicKey) };
  touch();
}

async function derive(password, kdf, salt) {
  if (kdf.algorithm !== "pbkdf2-sha256") {
    throw new Error(`this account uses ${kdf.algorithm}, which this browser page cannot run; use the polydev CLI`);
  }
  return v.split(await v.deriveMasterKey(password, kdf.iterations, salt));
}

/// Creates the account: derives keys here, sends only the login
/// credential and wrapped keys, then signs in and leaves the vault unlocked.
export async function signUp(email, password, acknowledged) {
  needSecureContext();
  checkPassword(password);
  if (!acknowledged) throw new Error("confirm that you understand a lost password cannot be recovered");
  const userId = crypto.randomUUID();
  const salt = crypto.getRandomValues(new Uint8Array(16));
  const master = await v.deriveMasterKey(password, v.MIN_PBKDF2_ITERATIONS, salt);
  const { wrappingKey, loginCredential } = await v.split(master);
  const vaultKey = crypto.getRandomValues(new Uint8Array(32));
  const sealing = await v.generateSealingKeyPair();
  const stored = {
    kdf: { algorithm: "pbkdf2-sha256", iterations: v.MIN_PBKDF2_ITERATIONS },
    salt: b64(salt),
    wrappedVaultKey: b64(await v.wrapVaultKey(wrappingKey, userId, vaultKey)),
    publicKey: b64(sealing.publicKey),
    wrappedPrivateKey: b64(await v.sealEnvelope(vaultKey, v.KIND.sealingKey,
      { userId, itemId: "sealing-key", version: 0 }, sealing.privateKey)),
  };
  try {
    await api.signUp({ email, userId, loginCredential: b64(loginCredential), vault: stored });
    const result = await api.logIn(email, b64(loginCredential));
    await open(userId, wrappingKey, stored);
    return result.user;
  } finally {
    v.wipe(master, wrappingKey, loginCredential, vaultKey, sealing.privateKey);
  }
}

/// Signs in with the derived login credential and unlocks the vault.
export async function logIn(email, password) {
  needSecureContext();
  const pre = await api.prelogin(email);
  const { wrappingKey, loginCredential } = await derive(password, pre.kdf, unb64(pre.salt));
  try {
    const result = await api.logIn(email, b64(loginCredential));
    await open(result.user.id, wrappingKey, await api.vaultKeys());
    return result.user;
  } finally {
    v.wipe(wrappingKey, loginCredential);
  }
}

/// Unlocks the vault of the signed-in user (after a reload or a lock).
export async function unlock(user, password) {
  needSecureContext();
  let stored;
  try {
    stored = await api.vaultKeys();
  } catch (e) {
    if (e instanceof ApiError && e.code === "vault_not_set_up") {
      throw new Error("this account has no vault yet; set it up with `polydev vault init`");
    }
    throw e;
  }
  const { wrappingKey, loginCredential } = await derive(password, stored.kdf, unb64(stored.salt));
  try {
    await open(user.id, wrappingKey, stored);
  } finally {
    v.wipe(wrappingKey, loginCredential);
  }
}

// The highest version of each vault item this browser has seen, per user
// (ids and numbers only; the server knows them too). Every item's AAD binds
// its version, so a server cannot alter one unnoticed, but it could hand
// back an older, genuine one: that is refused here.
const seenKey = () => `polydev.vault.seen.${keys.userId}`;

function seenVersions() {
  try {
    return JSON.parse(localStorage.getItem(seenKey()) || "{}");
  } catch {
    return {};
  }
}

/// Records `version` of `itemId` as seen (only ever upwards).
function remember(itemId, version) {
  const seen = seenVersions();
  if ((seen[itemId] ?? 0) < version) {
    seen[itemId] = version;
    try {
      localStorage.setItem(seenKey(), JSON.stringify(seen));
    } catch {
      // Storage full or off: the check falls back to this page's lifetime.
    }
  }
}

/// The vault item `itemId` (with its envelope), or null when there is none;
/// an error when it is older than a version this browser has seen.
async function fetchItem(itemId) {
  let item;
  try {
    item = await api.vaultItem(itemId);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return null;
    throw e;
  }
  const seen = seenVersions()[itemId] ?? 0;
  if (item.version < seen) {
    throw new Error(`the server returned version ${item.version} of ${itemId}, older than version ${seen} this browser has already seen; refusing it (an old copy handed back is a rollback)`);
  }
  return item;
}

/// Stores `text` as the vault item `itemId`, encrypted here with the vault
/// key (kind 1; the item's next version is in the AAD).
export async function putSecret(itemId, text) {
  if (!keys) throw new Error("unlock your vault first");
  const version = (await fetchItem(itemId))?.version ?? 0;
  const envelope = await v.sealItem(keys.vaultKey,
    { userId: keys.userId, itemId, version: version + 1 }, new TextEncoder().encode(text));
  touch();
  const stored = await api.putVaultItem(itemId, version, b64(envelope));
  remember(itemId, version + 1);
  return stored;
}

/// The text of vault item `itemId` (kind 1), or null when there is none.
export async function getSecret(itemId) {
  if (!keys) throw new Error("unlock your vault first");
  const item = await fetchItem(itemId);
  if (!item) return null;
  const plain = await v.openItem(keys.vaultKey,
    { userId: keys.userId, itemId, version: item.version }, unb64(item.envelope));
  remember(itemId, item.version);
  touch();
  return new TextDecoder().decode(plain);
}

/// The CLI credential file a login session sealed to this user (vault item
/// `credential.<provider>`, kind 4, its AAD bound to the user, the item and
/// its version), opened here; null when there is none.
export async function openLoginCredential(provider) {
  if (!keys) throw new Error("unlock your vault first");
  const itemId = `credential.${provider}`;
  const item = await fetchItem(itemId);
  if (!item) return null;
  const plain = await v.open(keys.privateKey, "polydev/login-credential/v2",
    v.aad(4, { userId: keys.userId, itemId, version: item.version }), unb64(item.envelope));
  remember(itemId, item.version);
  touch();
  return plain;
}

/// A run's stored prompt (sealed to this user's key by the controller as
/// the run started; info polydev/run-prompt/v1, aad the run id).
export async function openRunPrompt(runId, sealedB64) {
  if (!keys) throw new Error("unlock your vault first");
  const plain = await v.open(keys.privateKey, "polydev/run-prompt/v1",
    new TextEncoder().encode(runId), unb64(sealedB64));
  touch();
  return new TextDecoder().decode(plain);
}

/// What `provider`'s CLI changed in a run's workspace: a git diff sealed
/// to this user's key inside its sandbox (info polydev/run-diff/v1, aad
/// `<runId>/<provider>`).
export async function openRunDiff(runId, provider, sealedB64) {
  if (!keys) throw new Error("unlock your vault first");
  const plain = await v.open(keys.privateKey, "polydev/run-diff/v1",
    new TextEncoder().encode(`${runId}/${provider}`), unb64(sealedB64));
  touch();
  return plain;
}

/// A run's stored answer from `provider` (sealed to this user's key by the
/// controller as the run ended; info polydev/run-answer/v1, aad `<runId>/<provider>`).
export async function openRunAnswer(runId, provider, sealedB64) {
  if (!keys) throw new Error("unlock your vault first");
  const plain = await v.open(keys.privateKey, "polydev/run-answer/v1",
    new TextEncoder().encode(`${runId}/${provider}`), unb64(sealedB64));
  touch();
  return plain;
}
