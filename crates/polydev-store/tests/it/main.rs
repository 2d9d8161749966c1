//! The store's behaviour, run identically on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use polydev_domain::{Email, Role, UserId};
use polydev_store::testing::TestDatabase;
use polydev_store::{
    now_ms, Backend, EgressCredential, NewToken, NewUser, StoreError, TokenKind, UsageDelta,
};

/// Expands each test into a `sqlite` and a `postgres` variant.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(polydev_store::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(polydev_store::Backend::Postgres).await })*
        }
    };
}

on_both_backends!(
    migrations_apply_once_and_are_recorded,
    users_round_trip_and_emails_are_unique,
    unknown_ids_are_not_found,
    tokens_resolve_to_their_owner_until_revoked_or_expired,
    token_for_unknown_user_is_not_found,
    listing_pages_users_in_creation_order,
    egress_credentials_resolve_until_revoked,
    proxy_ports_are_assigned_lowest_free_and_kept,
    egress_usage_adds_up,
    vault_items_use_optimistic_concurrency_and_stay_per_user,
    vault_keys_are_set_once_and_replaced_by_a_password_change,
    the_daily_run_quota_counts_per_user_and_day_up_to_its_limit,
);

fn new_user(email: &str, role: Role, at: i64) -> NewUser {
    NewUser {
        id: UserId::new(),
        email: Email::parse(email).unwrap(),
        password_hash: Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
        role,
        created_at_ms: at,
    }
}

async fn migrations_apply_once_and_are_recorded(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = polydev_store::Store::connect(db.url(), &Default::default())
        .await
        .unwrap();
    assert!(store.applied_versions().await.unwrap().is_empty());
    let applied = store.migrate().await.unwrap();
    assert!(!applied.is_empty());
    assert_eq!(
        store.applied_versions().await.unwrap().last().copied(),
        Some(store.latest_known_version())
    );
    assert!(
        store.migrate().await.unwrap().is_empty(),
        "second run applies nothing"
    );
    store.ping().await.unwrap();
}

async fn users_round_trip_and_emails_are_unique(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let new = new_user("Ada@Example.com", Role::Admin, 1_700_000_000_000);
    let created = store.create_user(&new).await.unwrap();
    assert_eq!(store.user_by_id(new.id).await.unwrap(), created);
    let (user, hash) = store.user_with_password(&new.email).await.unwrap();
    assert_eq!(user.role, Role::Admin);
    assert_eq!(user.email.as_str(), "ada@example.com");
    assert_eq!(hash, new.password_hash);

    let again = new_user("ada@example.com", Role::User, 1);
    match store.create_user(&again).await {
        Err(StoreError::Conflict("email")) => {}
        other => panic!("expected an email conflict, got {other:?}"),
    }
    assert_eq!(store.count_users().await.unwrap(), 1);
}

async fn unknown_ids_are_not_found(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    assert!(matches!(
        store.user_by_id(UserId::new()).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .user_with_password(&Email::parse("nobody@example.com").unwrap())
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_token("00").await,
        Err(StoreError::NotFound)
    ));
}

async fn tokens_resolve_to_their_owner_until_revoked_or_expired(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let user = store
        .create_user(&new_user("bob@example.com", Role::User, now_ms()))
        .await
        .unwrap();
    let now = now_ms();
    let api = NewToken {
        user_id: user.id,
        kind: TokenKind::Api,
        token_hash: "aa".repeat(32),
        created_at_ms: now,
        expires_at_ms: None,
    };
    let session = NewToken {
        kind: TokenKind::Session,
        token_hash: "bb".repeat(32),
        expires_at_ms: Some(now + 1_000),
        ..api.clone()
    };
    store.create_token(&api).await.unwrap();
    store.create_token(&session).await.unwrap();

    let owner = store.token_owner(&api.token_hash, now).await.unwrap();
    assert_eq!(owner.user, user);
    assert_eq!(owner.kind, TokenKind::Api);
    assert_eq!(
        store
            .token_owner(&session.token_hash, now)
            .await
            .unwrap()
            .kind,
        TokenKind::Session
    );
    // Expired at its deadline, and swept.
    assert!(matches!(
        store.token_owner(&session.token_hash, now + 1_000).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(store.delete_expired_tokens(now + 1_000).await.unwrap(), 1);
    // Revoked.
    store.delete_token(&api.token_hash).await.unwrap();
    assert!(matches!(
        store.token_owner(&api.token_hash, now).await,
        Err(StoreError::NotFound)
    ));
}

async fn token_for_unknown_user_is_not_found(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let token = NewToken {
        user_id: UserId::new(),
        kind: TokenKind::Api,
        token_hash: "cc".repeat(32),
        created_at_ms: now_ms(),
        expires_at_ms: None,
    };
    assert!(matches!(
        store.create_token(&token).await,
        Err(StoreError::NotFound)
    ));
}

async fn listing_pages_users_in_creation_order(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    for i in 0..5 {
        store
            .create_user(&new_user(
                &format!("u{i}@example.com"),
                Role::User,
                1000 + i,
            ))
            .await
            .unwrap();
    }
    let page: Vec<String> = store
        .list_users(2, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.email.to_string())
        .collect();
    assert_eq!(page, ["u1@example.com", "u2@example.com"]);
}

async fn egress_credentials_resolve_until_revoked(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let user = store
        .create_user(&new_user("ada@example.com", Role::User, 1))
        .await
        .unwrap();
    let cred = |name: &str, sandbox: &str| EgressCredential {
        username: name.into(),
        secret_hash: "ab".repeat(32),
        user_id: user.id,
        sandbox_id: sandbox.into(),
        template: "runtime".into(),
        created_at_ms: 5,
    };
    store
        .create_egress_credential(&cred("sbx-a", "a"))
        .await
        .unwrap();
    store
        .create_egress_credential(&cred("sbx-b", "b"))
        .await
        .unwrap();
    store
        .create_egress_credential(&cred("sbx-b2", "b"))
        .await
        .unwrap();
    assert_eq!(
        store.egress_credential("sbx-a").await.unwrap(),
        cred("sbx-a", "a")
    );
    assert!(matches!(
        store.create_egress_credential(&cred("sbx-a", "a")).await,
        Err(StoreError::Conflict(_))
    ));
    store.revoke_egress_credential("sbx-a", 9).await.unwrap();
    assert!(matches!(
        store.egress_credential("sbx-a").await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.revoke_egress_credential("sbx-a", 9).await,
        Err(StoreError::NotFound)
    ));
    let mut revoked = store
        .revoke_egress_credentials_of_sandbox("b", 10)
        .await
        .unwrap();
    revoked.sort();
    assert_eq!(revoked, ["sbx-b", "sbx-b2"]);
    assert!(matches!(
        store.egress_credential("sbx-b2").await,
        Err(StoreError::NotFound)
    ));
    let ghost = EgressCredential {
        user_id: UserId::new(),
        ..cred("sbx-c", "c")
    };
    assert!(matches!(
        store.create_egress_credential(&ghost).await,
        Err(StoreError::NotFound)
    ));
}

async fn proxy_ports_are_assigned_lowest_free_and_kept(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let mut users = Vec::new();
    for i in 0..4 {
        users.push(
            store
                .create_user(&new_user(&format!("u{i}@example.com"), Role::User, i))
                .await
                .unwrap()
                .id,
        );
    }
    // Users 0 and 1 are using their egress (a live credential each).
    for (i, user) in users.iter().take(2).enumerate() {
        store
            .create_egress_credential(&polydev_store::EgressCredential {
                username: format!("sbx-{i}"),
                secret_hash: "ab".repeat(32),
                user_id: *user,
                sandbox_id: format!("s{i}"),
                template: "runtime".into(),
                created_at_ms: 1,
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store
            .assign_proxy_port(users[0], 10001, 10002, 1)
            .await
            .unwrap(),
        10001
    );
    assert_eq!(
        store
            .assign_proxy_port(users[1], 10001, 10002, 1)
            .await
            .unwrap(),
        10002
    );
    assert_eq!(
        store
            .assign_proxy_port(users[0], 10001, 10002, 1)
            .await
            .unwrap(),
        10001,
        "kept"
    );
    // Full, and both holders are live: no port for user 2.
    assert!(matches!(
        store.assign_proxy_port(users[2], 10001, 10002, 1).await,
        Err(StoreError::Conflict("port"))
    ));
    assert_eq!(
        store.proxy_ports().await.unwrap(),
        vec![(users[0], 10001), (users[1], 10002)]
    );
    // User 1's sandbox ends: its port goes back to the range for the next.
    store
        .revoke_egress_credentials_of_sandbox("s1", 2)
        .await
        .unwrap();
    assert_eq!(
        store
            .assign_proxy_port(users[2], 10001, 10002, 3)
            .await
            .unwrap(),
        10002
    );
    assert_eq!(
        store.proxy_ports().await.unwrap(),
        vec![(users[0], 10001), (users[2], 10002)]
    );
    // User 3 finds the range full of live users again.
    store
        .create_egress_credential(&polydev_store::EgressCredential {
            username: "sbx-2".into(),
            secret_hash: "ab".repeat(32),
            user_id: users[2],
            sandbox_id: "s2".into(),
            template: "runtime".into(),
            created_at_ms: 4,
        })
        .await
        .unwrap();
    assert!(matches!(
        store.assign_proxy_port(users[3], 10001, 10002, 5).await,
        Err(StoreError::Conflict("port"))
    ));
}

async fn egress_usage_adds_up(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let user = store
        .create_user(&new_user("ada@example.com", Role::User, 1))
        .await
        .unwrap()
        .id;
    let delta = |sandbox: &str, up: i64| UsageDelta {
        user_id: user,
        sandbox_id: sandbox.into(),
        bytes_up: up,
        bytes_down: 2 * up,
        requests: 1,
        tunnels: 0,
    };
    store
        .add_egress_usage(&[delta("a", 10), delta("b", 1)], 100)
        .await
        .unwrap();
    store.add_egress_usage(&[delta("a", 5)], 200).await.unwrap();
    let usage = store.egress_usage(user).await.unwrap();
    assert_eq!(usage.len(), 2);
    assert_eq!(
        (
            usage[0].sandbox_id.as_str(),
            usage[0].bytes_up,
            usage[0].bytes_down,
            usage[0].requests,
            usage[0].updated_at_ms
        ),
        ("a", 15, 30, 2, 200)
    );
    assert_eq!((usage[1].sandbox_id.as_str(), usage[1].bytes_up), ("b", 1));
}

async fn vault_items_use_optimistic_concurrency_and_stay_per_user(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let ada = store
        .create_user(&new_user("ada@example.com", Role::User, 1))
        .await
        .unwrap()
        .id;
    let bob = store
        .create_user(&new_user("bob@example.com", Role::User, 2))
        .await
        .unwrap()
        .id;
    let env1 = vec![0x50u8, 1, 1, 9, 9, 9];
    assert_eq!(
        store
            .put_vault_item(ada, "codex", 0, &env1, 10)
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        store.put_vault_item(ada, "codex", 0, &env1, 11).await,
        Err(StoreError::Conflict("version"))
    ));
    assert_eq!(
        store
            .put_vault_item(ada, "codex", 1, b"second", 12)
            .await
            .unwrap(),
        2
    );
    assert!(matches!(
        store.put_vault_item(ada, "codex", 1, b"stale", 13).await,
        Err(StoreError::Conflict("version"))
    ));
    let item = store.vault_item(ada, "codex").await.unwrap();
    assert_eq!(
        (
            item.version,
            item.envelope.as_slice(),
            item.created_at_ms,
            item.updated_at_ms
        ),
        (2, &b"second"[..], 10, 12)
    );
    // Bob sees nothing of Ada's.
    assert!(matches!(
        store.vault_item(bob, "codex").await,
        Err(StoreError::NotFound)
    ));
    assert!(store.vault_items(bob).await.unwrap().is_empty());
    let meta = store.vault_items(ada).await.unwrap();
    assert_eq!(
        (meta[0].item_id.as_str(), meta[0].version, meta[0].size),
        ("codex", 2, 6)
    );
    assert!(matches!(
        store.delete_vault_item(ada, "codex", 1).await,
        Err(StoreError::Conflict("version"))
    ));
    assert!(matches!(
        store.delete_vault_item(bob, "codex", 2).await,
        Err(StoreError::NotFound)
    ));
    store.delete_vault_item(ada, "codex", 2).await.unwrap();
    assert!(matches!(
        store.delete_vault_item(ada, "codex", 2).await,
        Err(StoreError::NotFound)
    ));
}

async fn vault_keys_are_set_once_and_replaced_by_a_password_change(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let ada = store
        .create_user(&new_user("ada@example.com", Role::User, 1))
        .await
        .unwrap()
        .id;
    assert!(matches!(
        store.vault_keys(ada).await,
        Err(StoreError::NotFound)
    ));
    let keys = polydev_store::VaultKeys {
        kdf: "pbkdf2-sha256:600000".into(),
        kdf_salt: vec![1; 16],
        wrapped_vault_key: vec![0x50, 1, 2, 0, 255],
        public_key: vec![4; 65],
        wrapped_private_key: vec![0x50, 1, 3],
        updated_at_ms: 5,
    };
    store.put_vault_keys(ada, &keys).await.unwrap();
    assert_eq!(store.vault_keys(ada).await.unwrap(), keys);
    let changed = polydev_store::VaultKeys {
        kdf_salt: vec![2; 16],
        wrapped_vault_key: vec![0x50, 1, 2, 7],
        updated_at_ms: 6,
        ..keys
    };
    assert!(matches!(
        store.put_vault_keys(ada, &changed).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .change_password(ada, "$argon2id$new", &changed)
        .await
        .unwrap();
    assert_eq!(store.vault_keys(ada).await.unwrap(), changed);
    let (_, hash) = store
        .user_with_password(&Email::parse("ada@example.com").unwrap())
        .await
        .unwrap();
    assert_eq!(hash.as_deref(), Some("$argon2id$new"));
}

async fn the_daily_run_quota_counts_per_user_and_day_up_to_its_limit(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let store = db.store().await;
    let ada = store
        .create_user(&new_user("ada@example.com", Role::User, 1))
        .await
        .unwrap()
        .id;
    let bob = store
        .create_user(&new_user("bob@example.com", Role::User, 2))
        .await
        .unwrap()
        .id;
    let take = |u, day| {
        let store = store.clone();
        async move { store.take_run_quota(u, day, 2).await.unwrap() }
    };
    assert_eq!(take(ada, 100).await, Some(1));
    assert_eq!(take(ada, 100).await, Some(2));
    assert_eq!(take(ada, 100).await, None);
    assert_eq!(take(ada, 100).await, None, "a refusal takes no place");
    assert_eq!(take(bob, 100).await, Some(1), "per user");
    assert_eq!(take(ada, 101).await, Some(1), "per day");
    // Concurrent takes of the last places: exactly the limit succeed.
    let takes: Vec<_> = (0..8).map(|_| take(bob, 102)).collect();
    let got = futures_util::future::join_all(takes).await;
    assert_eq!(got.iter().filter(|g| g.is_some()).count(), 2, "{got:?}");
}
