//! The vault's storage API and the `polydev vault` CLI, on SQLite and
//! PostgreSQL, with a canary that must never appear in plaintext.

use std::io::Write;
use std::process::{Command, Stdio};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use polydev_store::Backend;
use polydev_vault::{ItemContext, KdfSpec, SealingKeyPair, VaultKey};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::app::{TestApp, BIN};
use crate::on_both_backends;

on_both_backends!(
    vault_storage_checks_shapes_versions_and_owners,
    the_cli_round_trip_leaves_no_plaintext_anywhere
);

fn keys_body(user_id: &str) -> serde_json::Value {
    let spec = KdfSpec {
        salt: [3; 16],
        ..KdfSpec::generate()
    };
    let (wrapping, _) = spec
        .derive(&secrecy::SecretString::from("correct horse"))
        .unwrap()
        .split();
    let vault = VaultKey::generate();
    let sealing = SealingKeyPair::generate();
    json!({
        "kdf": {"algorithm": "pbkdf2-sha256", "iterations": 600000},
        "salt": B64.encode(spec.salt),
        "wrappedVaultKey": B64.encode(vault.wrap(&wrapping, user_id)),
        "publicKey": B64.encode(sealing.public().to_bytes()),
        "wrappedPrivateKey": B64.encode(sealing.wrap(&vault, user_id)),
    })
}

async fn vault_storage_checks_shapes_versions_and_owners(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // Sign-up sets up a vault; an account made without a password has none.
    let (_, signed_up) = app.user("carol@example.com").await;
    assert_eq!(
        app.get("/api/vault/keys", Some(&signed_up)).await.status,
        StatusCode::OK
    );
    let made: serde_json::Value = serde_json::from_slice(
        &app.cli(&["user", "add", "--email", "ada@example.com"])
            .stdout,
    )
    .unwrap();
    let (ada_id, ada) = (
        made["id"].as_str().unwrap().to_owned(),
        made["token"].as_str().unwrap().to_owned(),
    );
    let (_, bob) = app.user("bob@example.com").await;

    let r = app.get("/api/vault/keys", Some(&ada)).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "vault_not_set_up")
    );
    let good = keys_body(&ada_id);
    let mut weak = good.clone();
    weak["kdf"]["iterations"] = json!(1000);
    let r = app
        .send(Method::PUT, "/api/vault/keys", Some(&ada), Some(weak))
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::BAD_REQUEST, "weak_kdf")
    );
    let mut bad = good.clone();
    bad["wrappedVaultKey"] =
        json!(B64.encode(b"not an envelope at all, but long enough to pass a length check..."));
    let r = app
        .send(Method::PUT, "/api/vault/keys", Some(&ada), Some(bad))
        .await;
    assert_eq!(r.error_code(), "invalid_envelope");
    let mut bad = good.clone();
    bad["publicKey"] = json!(B64.encode([4u8; 65]));
    let r = app
        .send(Method::PUT, "/api/vault/keys", Some(&ada), Some(bad))
        .await;
    assert_eq!(r.error_code(), "invalid_public_key");
    let r = app
        .send(
            Method::PUT,
            "/api/vault/keys",
            Some(&ada),
            Some(good.clone()),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(app.get("/api/vault/keys", Some(&ada)).await.body, good);
    let again = app
        .send(
            Method::PUT,
            "/api/vault/keys",
            Some(&ada),
            Some(keys_body(&ada_id)),
        )
        .await;
    assert_eq!(
        (again.status, again.error_code()),
        (StatusCode::CONFLICT, "vault_exists")
    );

    let key = VaultKey::generate();
    let envelope = |version: u64, text: &[u8]| {
        B64.encode(key.seal_item(&ItemContext::new(&ada_id, "codex", version), text))
    };
    let put = |token: String, version: i64, env: String| {
        let app = &app;
        async move {
            app.send(
                Method::PUT,
                "/api/vault/items/codex",
                Some(&token),
                Some(json!({"version": version, "envelope": env})),
            )
            .await
        }
    };
    let r = put(ada.clone(), 0, envelope(1, b"v1")).await;
    assert_eq!(
        (r.status, r.body["version"].clone()),
        (StatusCode::OK, json!(1)),
        "{}",
        r.text
    );
    let r = put(ada.clone(), 0, envelope(1, b"again")).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::CONFLICT, "version_conflict")
    );
    assert!(r.message().contains("version 1"), "{}", r.message());
    assert_eq!(
        put(ada.clone(), 1, envelope(2, b"v2")).await.body["version"],
        2
    );
    let stale = put(ada.clone(), 1, envelope(2, b"lost update")).await;
    assert_eq!(stale.status, StatusCode::CONFLICT);

    let got = app.get("/api/vault/items/codex", Some(&ada)).await;
    let bytes = B64.decode(got.body["envelope"].as_str().unwrap()).unwrap();
    assert_eq!(
        key.open_item(&ItemContext::new(&ada_id, "codex", 2), &bytes)
            .unwrap()
            .as_slice(),
        b"v2"
    );
    // Bob cannot tell Ada's item exists.
    let r = app.get("/api/vault/items/codex", Some(&bob)).await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::NOT_FOUND, "item_not_found")
    );
    let r = app
        .send(
            Method::DELETE,
            "/api/vault/items/codex?version=2",
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        app.get("/api/vault/items", Some(&bob)).await.body,
        json!({"items": []})
    );
    let list = app.get("/api/vault/items", Some(&ada)).await;
    assert_eq!(list.body["items"][0]["id"], "codex");
    assert!(list.body["items"][0].get("envelope").is_none());

    // Bad input.
    let r = put(
        ada.clone(),
        0,
        B64.encode(b"plaintext is not an envelope, the server says so"),
    )
    .await;
    assert_eq!(r.error_code(), "invalid_envelope");
    let big =
        B64.encode(key.seal_item(&ItemContext::new(&ada_id, "big", 1), &vec![0u8; 300 * 1024]));
    let r = app
        .send(
            Method::PUT,
            "/api/vault/items/big",
            Some(&ada),
            Some(json!({"version": 0, "envelope": big})),
        )
        .await;
    assert!(
        r.status == StatusCode::PAYLOAD_TOO_LARGE,
        "{} {}",
        r.status,
        r.text
    );
    let r = app.get("/api/vault/items/bad%20id", Some(&ada)).await;
    assert_eq!(r.error_code(), "invalid_item_id");
    assert_eq!(
        app.get("/api/vault/items", None).await.status,
        StatusCode::UNAUTHORIZED
    );

    let r = app
        .send(
            Method::DELETE,
            "/api/vault/items/codex?version=1",
            Some(&ada),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = app
        .send(
            Method::DELETE,
            "/api/vault/items/codex?version=2",
            Some(&ada),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

fn vault_cli(
    app: &TestApp,
    token: &str,
    session: Option<&str>,
    args: &[&str],
    stdin: &[u8],
) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("vault")
        .args(args)
        .args(["--server", &app.base])
        .env("POLYDEV_TOKEN", token);
    if let Some(s) = session {
        cmd.env("POLYDEV_VAULT_SESSION", s);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

async fn the_cli_round_trip_leaves_no_plaintext_anywhere(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let canary = format!("canary-credential-{}", uuid::Uuid::new_v4().simple());
    let password = "vault password 1";

    // A password-less account sets its vault up with `polydev vault init`, once.
    let made: serde_json::Value = serde_json::from_slice(
        &app.cli(&["user", "add", "--email", "ops@example.com"])
            .stdout,
    )
    .unwrap();
    let ops = made["token"].as_str().unwrap().to_owned();
    let out = tokio::task::block_in_place(|| {
        vault_cli(
            &app,
            &ops,
            None,
            &["init"],
            format!("{password}\n").as_bytes(),
        )
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = tokio::task::block_in_place(|| {
        vault_cli(
            &app,
            &ops,
            None,
            &["init"],
            format!("{password}\n").as_bytes(),
        )
    });
    assert!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already set up")
    );

    // Sign-up (keys made on the client), then unlock, put, get from the CLI.
    let (body, e) = crate::app::signup("ada@example.com", password);
    assert_eq!(
        app.post("/api/users", None, body.clone()).await.status,
        StatusCode::CREATED
    );

    let token = app
        .post(
            "/api/auth/login",
            None,
            crate::app::login_body("ada@example.com", &e),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let wrong = tokio::task::block_in_place(|| {
        vault_cli(&app, &token, None, &["unlock"], b"not the password\n")
    });
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong password"));
    let out = tokio::task::block_in_place(|| {
        vault_cli(
            &app,
            &token,
            None,
            &["unlock"],
            format!("{password}\n").as_bytes(),
        )
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(
        B64.decode(&session).unwrap(),
        e.vault_key.as_bytes(),
        "unlock recovers the sign-up vault key"
    );

    let credential = format!("{{\"OPENAI_API_KEY\":\"{canary}\"}}");
    for _ in 0..2 {
        let out = tokio::task::block_in_place(|| {
            vault_cli(
                &app,
                &token,
                Some(&session),
                &["put", "codex"],
                credential.as_bytes(),
            )
        });
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = tokio::task::block_in_place(|| {
        vault_cli(&app, &token, Some(&session), &["get", "codex"], b"")
    });
    assert_eq!(String::from_utf8(out.stdout).unwrap(), credential);
    let out = tokio::task::block_in_place(|| vault_cli(&app, &token, None, &["list"], b""));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (list[0]["id"].clone(), list[0]["version"].clone()),
        (json!("codex"), json!(2))
    );

    // The relay mailboxes are gone: sealed credentials reach a sandbox
    // through its run (POST /api/runs/{id}/credentials) only.
    let r = app
        .post(
            "/api/vault/relay/sandbox-1",
            Some(&token),
            json!({"sealed": "UAEE"}),
        )
        .await;
    assert!(
        [StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED].contains(&r.status),
        "{}",
        r.text
    );

    // Nowhere in plaintext: the store (file or dump), the debug logs, /metrics.
    let at_rest = match backend {
        Backend::Sqlite => app.at_rest(),
        Backend::Postgres => {
            let dump = Command::new("pg_dump")
                .arg(app.db.url())
                .output()
                .expect("pg_dump is installed");
            assert!(
                dump.status.success(),
                "{}",
                String::from_utf8_lossy(&dump.stderr)
            );
            String::from_utf8_lossy(&dump.stdout).into_owned()
        }
    };
    assert!(at_rest.contains("vault_items"), "the store was not read");
    let logs = app.settled_logs().await;
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (place, text) in [("store", &at_rest), ("logs", &logs), ("metrics", &metrics)] {
        assert!(!text.contains(&canary), "the canary is in the {place}");
        assert!(
            !text.contains(&session),
            "the session key is in the {place}"
        );
        assert!(!text.contains(password), "the password is in the {place}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prelogin_login_cli_and_password_change() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (body, e) = crate::app::signup("ada@example.com", "first password 1");
    assert_eq!(
        app.post("/api/users", None, body.clone()).await.status,
        StatusCode::CREATED
    );
    let user_id = body["userId"].as_str().unwrap().to_owned();

    // Prelogin: the real salt for an account; stable made-up ones otherwise.
    let pre = app
        .get("/api/auth/prelogin?email=ada@example.com", None)
        .await;
    assert_eq!(pre.body["salt"], B64.encode(e.spec.salt));
    assert_eq!(
        pre.body["kdf"],
        json!({"algorithm": "pbkdf2-sha256", "iterations": 600000})
    );
    let ghost = app
        .get("/api/auth/prelogin?email=nobody@example.com", None)
        .await;
    assert_eq!(ghost.status, StatusCode::OK);
    assert_eq!(
        ghost.body["kdf"], pre.body["kdf"],
        "unknown emails look like real ones"
    );
    assert_eq!(
        B64.decode(ghost.body["salt"].as_str().unwrap())
            .unwrap()
            .len(),
        16
    );
    assert_eq!(
        app.get("/api/auth/prelogin?email=nobody@example.com", None)
            .await
            .body,
        ghost.body,
        "stable"
    );
    assert_ne!(
        app.get("/api/auth/prelogin?email=other@example.com", None)
            .await
            .body["salt"],
        ghost.body["salt"]
    );
    assert_eq!(
        app.get("/api/auth/prelogin?email=nope", None)
            .await
            .error_code(),
        "invalid_email"
    );

    // `polydev login` derives on the client.
    let login = |password: &str| {
        let mut child = Command::new(BIN)
            .args(["login", "--server", &app.base, "--email", "ada@example.com"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{password}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let out = tokio::task::block_in_place(|| login("first password 1"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_session = app
        .post(
            "/api/auth/login",
            None,
            crate::app::login_body("ada@example.com", &e),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = tokio::task::block_in_place(|| login("wrong password 1"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("email or password is wrong"));

    // Password change: the vault key is re-wrapped, items stay readable.
    let item = e
        .vault_key
        .seal_item(&ItemContext::new(&user_id, "codex", 1), b"still mine");
    let r = app
        .send(
            Method::PUT,
            "/api/vault/items/codex",
            Some(&token),
            Some(json!({"version": 0, "envelope": B64.encode(&item)})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let spec = KdfSpec::generate();
    let (new_wrapping, new_login) = spec
        .derive(&secrecy::SecretString::from("second password 2"))
        .unwrap()
        .split();
    let new_vault = json!({
        "kdf": {"algorithm": "pbkdf2-sha256", "iterations": 600000},
        "salt": B64.encode(spec.salt),
        "wrappedVaultKey": B64.encode(e.vault_key.wrap(&new_wrapping, &user_id)),
        "publicKey": B64.encode(&e.public_key),
        "wrappedPrivateKey": B64.encode(&e.wrapped_private_key),
    });
    let change = |current: String| json!({"currentLoginCredential": current, "newLoginCredential": B64.encode(new_login.as_bytes()), "vault": new_vault.clone()});
    let r = app
        .post(
            "/api/auth/password",
            Some(&token),
            change(B64.encode([9u8; 32])),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (StatusCode::UNAUTHORIZED, "invalid_credentials")
    );
    let r = app
        .post(
            "/api/auth/password",
            Some(&token),
            change(B64.encode(e.login_credential.as_bytes())),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert_eq!(
        app.get("/api/me", Some(&other_session)).await.status,
        StatusCode::UNAUTHORIZED,
        "other sessions end"
    );
    assert_eq!(
        app.get("/api/me", Some(&token)).await.status,
        StatusCode::OK,
        "this one stays"
    );
    let out = tokio::task::block_in_place(|| login("first password 1"));
    assert!(!out.status.success(), "the old password no longer works");
    let out = tokio::task::block_in_place(|| login("second password 2"));
    assert!(out.status.success());
    let keys = app.get("/api/vault/keys", Some(&token)).await;
    let unwrapped = VaultKey::unwrap(
        &B64.decode(keys.body["wrappedVaultKey"].as_str().unwrap())
            .unwrap(),
        &new_wrapping,
        &user_id,
    )
    .unwrap();
    let got = app.get("/api/vault/items/codex", Some(&token)).await;
    let opened = unwrapped
        .open_item(
            &ItemContext::new(&user_id, "codex", 1),
            &B64.decode(got.body["envelope"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
    assert_eq!(opened.as_slice(), b"still mine");
}
