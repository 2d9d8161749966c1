//! The vault's browser module (Web Crypto + @hpke/core in real Chromium)
//! and the Rust crate agree byte for byte, both ways.

use polydev_vault::{ItemContext, KdfParams, KdfSpec, SealingKeyPair, VaultKey};
use secrecy::SecretString;
use serde_json::{json, Value};

fn run_in_chromium(request: &Value) -> Value {
    crate::app::run_browser_script("vault-interop.mjs", request)
}

#[test]
fn the_browser_module_and_the_rust_crate_agree_both_ways() {
    let user_id = "0b7c6a1e-5b0d-4c84-9d57-1f1f0f6b2a11";
    let password = "correct horse battery staple";
    let salt = [5u8; 16];
    let spec = KdfSpec {
        params: KdfParams::default(),
        salt,
    };
    let master = spec.derive(&SecretString::from(password)).unwrap();
    let (wrapping, login) = master.split();

    let vault_key = VaultKey::generate();
    let ctx = ItemContext::new(user_id, "item-1", 3);
    let item = vault_key.seal_item(&ctx, b"rust canary credential");
    let sandbox = SealingKeyPair::derive(&[9u8; 32]);
    let sealed = sandbox
        .public()
        .seal("sandbox-credential", b"run-7", b"rust sealed secret");
    let user_pair = SealingKeyPair::generate();

    let answer = run_in_chromium(&json!({
        "password": password,
        "salt": hex::encode(salt),
        "userId": user_id,
        "rust": {
            "wrappedVaultKey": hex::encode(vault_key.wrap(&wrapping, user_id)),
            "ctx": {"userId": user_id, "itemId": "item-1", "version": 3},
            "item": hex::encode(&item),
            "sealingIkm": hex::encode([9u8; 32]),
            "purpose": "sandbox-credential",
            "aad": "run-7",
            "sealed": hex::encode(&sealed),
            "userPublicKey": hex::encode(user_pair.public().to_bytes()),
        },
        "browserCtx": {"userId": user_id, "itemId": "item-2", "version": 1},
        "browserPlaintext": "browser canary credential",
    }));

    // Known answers in Chromium: RFC 5869, RFC 9180 A.3.1, the frozen split.
    let kat = &answer["kat"];
    assert_eq!(
        kat["rfc5869"],
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    );
    assert_eq!(
        kat["rfc9180_skRm"],
        "f3ce7fdae57e1a310d87f1ebbde6f328be0a99cdbcadf4d6589cf29de4b8ffd2"
    );
    assert_eq!(
        kat["rfc9180_pkRm"],
        "04fe8c19ce0905191ebc298a9245792531f26f0cece2460639e8bc39cb7f706a826a779b4cf969b8a0e539c7f62fb3d30ad6aa8f80e30f1d128aafd68a2ce72ea0"
    );
    assert_eq!(
        kat["rfc9180_pt"],
        "4265617574792069732074727574682c20747275746820626561757479"
    );
    assert_eq!(
        kat["split_wrapping"],
        "7c0f91867e880c5d1974f71fdff27ec444515b3ce8909b02742e90f63b777fa9"
    );
    assert_eq!(
        kat["split_login"],
        "2194a46124fa2230f19cc969d18796051c2f6db3c7ed0e07a0c26ac6fd90a760"
    );

    // Rust → browser.
    assert_eq!(
        answer["made"]["loginCredential"],
        hex::encode(login.as_bytes()),
        "same password, same login credential"
    );
    assert_eq!(answer["opened"]["item"], "rust canary credential");
    assert_eq!(
        answer["opened"]["sealingPublicKey"],
        hex::encode(sandbox.public().to_bytes()),
        "DeriveKeyPair agrees"
    );
    assert_eq!(answer["opened"]["sealed"], "rust sealed secret");
    let errors = &answer["errors"];
    for (case, code) in [
        ("tampered", "undecryptable"),
        ("otherVersion", "undecryptable"),
        ("truncated", "truncated"),
        ("newer", "unsupported_version"),
        ("downgrade", "downgrade"),
        ("wrongPurpose", "undecryptable"),
        ("weakKdf", "weak_kdf"),
    ] {
        assert_eq!(errors[case], code, "{case}");
    }

    // Browser → Rust.
    let made = &answer["made"];
    let browser_key = VaultKey::unwrap(
        &hex::decode(made["wrappedVaultKey"].as_str().unwrap()).unwrap(),
        &wrapping,
        user_id,
    )
    .unwrap();
    let opened = browser_key
        .open_item(
            &ItemContext::new(user_id, "item-2", 1),
            &hex::decode(made["item"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
    assert_eq!(opened.as_slice(), b"browser canary credential");
    let opened = user_pair
        .open(
            "sandbox-credential",
            b"run-7",
            &hex::decode(made["sealed"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
    assert_eq!(opened.as_slice(), b"browser canary credential");
}
