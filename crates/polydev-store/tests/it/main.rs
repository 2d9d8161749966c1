//! The store's behaviour, run identically on SQLite and on PostgreSQL.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use polydev_domain::{Email, Role, UserId};
use polydev_store::testing::TestDatabase;
use polydev_store::{now_ms, Backend, NewToken, NewUser, StoreError, TokenKind};

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
