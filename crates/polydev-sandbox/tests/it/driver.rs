use polydev_sandbox::Driver;
use std::time::Duration;

use crate::Host;

#[tokio::test]
async fn boots_runs_and_leaves_nothing() {
    let host = Host::start();
    let id = host.boot(&host.spec()).await;
    let (code, out, err) = host
        .sh(&id, "id -u; hostname; echo hi > ~/f; cat ~/f")
        .await;
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out, "1000\nsandbox\nhi\n");
    host.driver.destroy(&id).await.unwrap();
    assert!(host.driver.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn cannot_see_the_host_or_other_sandboxes() {
    let host = Host::start();
    // A canary beside the controller's data (the database lives here too).
    std::fs::write(host.dir.path().join("canary.db"), "secret").unwrap();
    let a = host.boot(&host.spec()).await;
    let b = host.boot(&host.spec()).await;
    host.sh(&a, "echo mine > ~/a-only").await;

    // Processes: only the sandbox's own (bwrap's init, the agent, the shell…).
    let (_, out, _) = host.sh(&b, "ls /proc | grep -c '^[0-9]'").await;
    let n: u32 = out.trim().parse().unwrap();
    assert!(n <= 5, "sees {n} processes");
    // Files: no controller data dir, no other sandbox's home, no host root's home.
    let data = host.dir.path().display().to_string();
    let (code, _, _) = host
        .sh(
            &b,
            &format!("ls {data}/canary.db || ls /root/. || cat ~/a-only"),
        )
        .await;
    assert_ne!(code, Some(0));
    let (_, out, _) = host.sh(&b, "ls / | tr '\\n' ' '").await;
    assert!(
        !out.contains("work") && !out.contains("var"),
        "root has {out}"
    );
    // Sockets: no agent socket (or anything else of the host's) is in
    // the sandbox's /run/polydev; the agent got its socket as a descriptor.
    let (_, out, _) = host.sh(&b, "ls -A /run/polydev").await;
    assert_eq!(out.trim(), "");

    // Network: loopback only; a host listener is unreachable.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_, out, _) = host
        .sh(
            &b,
            "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '",
        )
        .await;
    assert_eq!(out.trim(), "lo");
    let (code, _, _) = host
        .sh(&b, &format!("exec 3<>/dev/tcp/127.0.0.1/{port}"))
        .await;
    assert_ne!(code, Some(0));
    host.driver.destroy(&a).await.unwrap();
    host.driver.destroy(&b).await.unwrap();
}

#[tokio::test]
async fn seccomp_and_dropped_capabilities_refuse_privileged_calls() {
    let host = Host::start();
    let id = host.boot(&host.spec()).await;
    // New namespaces (a nested sandbox's first step) and mounts are refused.
    let (code, _, err) = host.sh(&id, "unshare -U true").await;
    assert_ne!(code, Some(0), "unshare worked: {err}");
    assert!(err.contains("Operation not permitted"), "{err}");
    let (code, _, _) = host.sh(&id, "mount -t tmpfs x /tmp").await;
    assert_ne!(code, Some(0));
    let (_, out, _) = host
        .sh(&id, "grep -E '^(CapEff|Seccomp):' /proc/self/status")
        .await;
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    host.driver.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn limits_stop_fork_bombs_and_memory_hogs_while_neighbours_work() {
    let host = Host::start();
    let mut spec = host.spec();
    spec.limits.pids = 64;
    spec.limits.memory_bytes = 64 << 20;
    let hog = host.boot(&spec).await;
    let neighbour = host.boot(&host.spec()).await;

    // Fork bomb: stopped at pids.max, the sandbox survives and is reclaimed.
    let mut agent = host
        .driver
        .agent(&hog, Duration::from_secs(5))
        .await
        .unwrap();
    let bomb = agent.exec(
        &["/bin/sh", "-c", "b() { b | b & }; b; sleep 2"],
        None,
        Duration::from_secs(5),
        |_| {},
    );
    let (code, out, _) = host.sh(&neighbour, "echo alive").await;
    assert_eq!((code, out.as_str()), (Some(0), "alive\n"));
    let _ = bomb.await;
    let stats = host.driver.stats(&hog).await.unwrap();
    assert!(stats.pids <= 64, "{stats:?}");

    // Memory hog: 200 MB in a 64 MiB sandbox is OOM-killed.
    let (code, _, _) = host
        .sh(&hog, "head -c 200000000 /dev/zero | tail > /dev/null")
        .await;
    assert_ne!(code, Some(0));
    assert!(host.driver.stats(&hog).await.unwrap().oom_kills >= 1);
    let (code, _, _) = host.sh(&neighbour, "true").await;
    assert_eq!(code, Some(0));
    host.driver.destroy(&hog).await.unwrap();
    host.driver.destroy(&neighbour).await.unwrap();
}

#[tokio::test]
async fn the_writable_layer_has_a_quota_and_the_image_stays_untouched() {
    let host = Host::start();
    let mut spec = host.spec();
    spec.limits.disk_bytes = 8 << 20;
    let id = host.boot(&spec).await;
    let (code, _, err) = host.sh(&id, "head -c 16000000 /dev/zero > ~/big").await;
    assert_ne!(code, Some(0));
    assert!(err.contains("No space left"), "{err}");
    // Writes land in the sandbox's layer, not in the shared image.
    let (code, _, err) = host.sh(&id, "rm ~/big && echo x > /tmp/mine").await;
    assert_eq!(code, Some(0), "{err}");
    assert!(!host.image.rootfs.join("tmp/mine").exists());
    // The image's own files belong to no one inside: read-only to the user.
    let (code, _, _) = host.sh(&id, "rm -f /etc/passwd").await;
    assert_ne!(code, Some(0));
    assert!(host.image.rootfs.join("etc/passwd").exists());
    host.driver.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn an_agent_that_never_starts_fails_at_the_deadline_with_its_log() {
    let host = Host::start();
    let fake = host.dir.path().join("fake-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'fake agent: waiting forever' >&2\nexec sleep 600\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let broken = host.images.build_minimal(&fake).unwrap();
    let id = polydev_sandbox::SandboxId::generate();
    let started = std::time::Instant::now();
    let err = host
        .driver
        .create(&id, &host.spec(), &broken, Duration::from_millis(800))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    match err {
        polydev_sandbox::DriverError::Boot {
            stage, log_tail, ..
        } => {
            assert_eq!(stage, "started");
            assert!(
                log_tail.iter().any(|l| l.contains("waiting forever")),
                "{log_tail:?}"
            );
        }
        other => panic!("{other}"),
    }
    // Nothing is left: no cgroup, no directory, no process.
    assert!(host.driver.list().await.unwrap().is_empty());
}
