// Entry point bundled by scripts/build-web.sh into public/vendor/hpke.js.
export { CipherSuite, DhkemP256HkdfSha256, HkdfSha256, Aes128Gcm, Aes256Gcm } from "@hpke/core";
