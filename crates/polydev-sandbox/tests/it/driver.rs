use polydev_sandbox::Driver;

use crate::Host;

#[tokio::test]
async fn boots_runs_and_leaves_nothing() {
    let host = Host::new();
    let id = host.boot(&host.spec()).await;
    let (code, out, err) = host
        .sh(&id, "id -u; hostname; echo hi > ~/f; cat ~/f")
        .await;
    assert_eq!(code, Some(0), "stderr: {err}");
    assert_eq!(out, "1000\nsandbox\nhi\n");
    host.driver.destroy(&id).await.unwrap();
    assert!(host.driver.list().await.unwrap().is_empty());
}
