//! The manager on the fake driver (the real agent in-process, a real
//! SQLite store): quotas, pool hand-out, failed boots, reconciliation, the
//! reaper and host admission, without a kernel sandbox per test.

use std::sync::Arc;
use std::time::Duration;

use polydev_domain::{Email, Role, SandboxStatus, UserId};
use polydev_store::testing::TestDatabase;
use polydev_store::{NewUser, Store};

use super::*;
use crate::fake::FakeDriver;

struct Setup {
    _db: TestDatabase,
    _images_dir: tempfile::TempDir,
    store: Store,
    driver: Arc<FakeDriver>,
    manager: Arc<Manager>,
}

async fn setup(cfg: ManagerConfig) -> Setup {
    let db = TestDatabase::sqlite();
    let store = db.store().await;
    let images_dir = tempfile::tempdir().unwrap();
    let images = ImageStore::new(images_dir.path());
    // The fake driver boots no image; the manager still wants one current.
    let image = images
        .build_minimal(&std::env::current_exe().unwrap())
        .unwrap();
    images.activate("minimal", &image.manifest.hash).unwrap();
    let driver = FakeDriver::new();
    let manager = Manager::new(
        driver.clone(),
        store.clone(),
        images,
        cfg,
        polydev_telemetry::metrics::SandboxMetrics::register(&mut Default::default()),
    );
    Setup {
        _db: db,
        _images_dir: images_dir,
        store,
        driver,
        manager,
    }
}

async fn user(store: &Store, email: &str) -> UserId {
    let id = UserId::new();
    store
        .create_user(&NewUser {
            id,
            email: Email::parse(email).unwrap(),
            password_hash: None,
            role: Role::User,
            created_at_ms: 0,
        })
        .await
        .unwrap();
    id
}

fn minimal() -> CreateRequest {
    CreateRequest {
        template: "minimal".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_quota_holds_under_concurrent_creates_and_is_per_user() {
    let s = setup(ManagerConfig {
        per_user_max: 3,
        ..Default::default()
    })
    .await;
    let ada = user(&s.store, "ada@example.com").await;
    let creates = (0..8).map(|_| {
        let m = s.manager.clone();
        tokio::spawn(async move { m.create(ada, minimal()).await })
    });
    let mut made = 0;
    for c in creates {
        match c.await.unwrap() {
            Ok(_) => made += 1,
            Err(ManagerError::UserQuota(3)) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(made, 3, "exactly the quota");
    assert_eq!(s.driver.ids().len(), 3, "refused creates booted nothing");
    let bob = user(&s.store, "bob@example.com").await;
    assert!(
        s.manager.create(bob, minimal()).await.is_ok(),
        "another user is not held up"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_hands_out_its_warm_members_and_refills() {
    let s = setup(ManagerConfig {
        pools: [("minimal".to_owned(), 2)].into(),
        ..Default::default()
    })
    .await;
    assert_eq!(s.manager.refill_pools().await.unwrap(), 2);
    assert_eq!((s.driver.booted(), s.manager.pool_len("minimal")), (2, 2));
    let warm = s.driver.ids();
    let ada = user(&s.store, "ada@example.com").await;
    let v = s.manager.create(ada, minimal()).await.unwrap();
    assert!(warm.contains(&v.id), "handed out from the pool");
    assert_eq!(s.driver.booted(), 2, "no boot for a warm hand-out");
    assert_eq!(v.status, SandboxStatus::Ready);
    assert_eq!(v.user_id, Some(ada.to_string()));
    assert_eq!(s.manager.pool_len("minimal"), 1);
    // The handed-out sandbox works: the real agent answers.
    let id = SandboxId::parse(&v.id).unwrap();
    let mut agent = s.manager.agent(&id, Duration::from_secs(5)).await.unwrap();
    let out = agent
        .exec(
            &["/bin/sh", "-c", "echo warm"],
            None,
            Duration::from_secs(5),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "warm\n");
    assert_eq!(s.manager.refill_pools().await.unwrap(), 1);
    assert_eq!(s.manager.pool_len("minimal"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_boot_leaves_a_failed_record_and_no_quota_used() {
    let s = setup(ManagerConfig {
        per_user_max: 1,
        ..Default::default()
    })
    .await;
    let ada = user(&s.store, "ada@example.com").await;
    s.driver
        .fail_boots
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let err = s.manager.create(ada, minimal()).await.unwrap_err();
    assert!(
        matches!(err, ManagerError::Driver(DriverError::Boot { .. })),
        "{err}"
    );
    let all = s.manager.list(Some(ada)).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].status, SandboxStatus::Failed);
    assert!(s.driver.ids().is_empty());
    assert!(
        s.manager.create(ada, minimal()).await.is_ok(),
        "the failed one does not count against the quota"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reconciliation_marks_vanished_sandboxes_lost_and_destroys_orphans() {
    let s = setup(ManagerConfig::default()).await;
    let ada = user(&s.store, "ada@example.com").await;
    let kept = s.manager.create(ada, minimal()).await.unwrap();
    let vanished = s.manager.create(ada, minimal()).await.unwrap();
    s.driver.vanish(&vanished.id);
    let orphan = SandboxId::generate();
    s.driver.plant(&orphan).await.unwrap();
    let report = s.manager.reconcile(false).await.unwrap();
    assert_eq!(
        (report.lost, report.orphans_destroyed),
        (1, 1),
        "{report:?}"
    );
    let status = |id: &str| {
        let (m, id) = (s.manager.clone(), SandboxId::parse(id).unwrap());
        async move { m.get(&id, None).await.unwrap().status }
    };
    assert_eq!(status(&vanished.id).await, SandboxStatus::Lost);
    assert_eq!(status(&kept.id).await, SandboxStatus::Ready);
    assert_eq!(
        s.driver.ids(),
        vec![kept.id.clone()],
        "the orphan and the lost one are gone"
    );
    // Nothing is left to do the second time.
    let again = s.manager.reconcile(false).await.unwrap();
    assert_eq!((again.lost, again.orphans_destroyed), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_ends_sandboxes_past_their_ttl_only() {
    let s = setup(ManagerConfig::default()).await;
    let ada = user(&s.store, "ada@example.com").await;
    let short = s
        .manager
        .create(
            ada,
            CreateRequest {
                ttl: Some(Duration::from_secs(1)),
                ..minimal()
            },
        )
        .await
        .unwrap();
    let long = s.manager.create(ada, minimal()).await.unwrap();
    assert_eq!(
        s.manager.reap().await.unwrap(),
        0,
        "nothing has expired yet"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if s.manager.reap().await.unwrap() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the short sandbox was never reaped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (v, want) in [
        (&short, SandboxStatus::Ended),
        (&long, SandboxStatus::Ready),
    ] {
        let id = SandboxId::parse(&v.id).unwrap();
        assert_eq!(s.manager.get(&id, None).await.unwrap().status, want);
    }
    assert_eq!(s.driver.ids(), vec![long.id.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_whose_sandboxes_use_most_of_their_memory_admits_none() {
    let s = setup(ManagerConfig {
        admit_memory_below: Some(0.9),
        ..Default::default()
    })
    .await;
    let ada = user(&s.store, "ada@example.com").await;
    *s.driver.memory.lock().unwrap() = Some((95, 100));
    let err = s.manager.create(ada, minimal()).await.unwrap_err();
    assert!(matches!(err, ManagerError::HostMemoryInUse), "{err}");
    assert_eq!(s.driver.booted(), 0);
    *s.driver.memory.lock().unwrap() = Some((50, 100));
    assert!(s.manager.create(ada, minimal()).await.is_ok());
}

/// A run's or login's sandbox (the reserved `provider` label) asks the
/// egress proxy for its CLI's own policy; any other for its template's.
#[test]
fn a_provider_s_sandbox_goes_by_its_own_egress_policy() {
    let spec = |labels: &[(&str, &str)]| SandboxSpec {
        template: "runtime".into(),
        limits: Default::default(),
        network: Default::default(),
        env: vec![],
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ttl: Duration::from_secs(60),
        egress: None,
        egress_auth: None,
    };
    assert_eq!(
        egress_policy_name(&spec(&[("provider", "copilot"), ("run", "r1")])),
        "runtime+copilot"
    );
    assert_eq!(egress_policy_name(&spec(&[("team", "a")])), "runtime");
}
