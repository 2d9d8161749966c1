//! The local driver against the real kernel: namespaces, cgroups, overlay,
//! seccomp. Needs root (as CI has) and bubblewrap.
#![allow(clippy::unwrap_used)]

mod driver;

use std::time::Duration;

use polydev_sandbox::{
    Driver, Image, ImageStore, LocalConfig, LocalDriver, SandboxId, SandboxSpec,
};

#[derive(Debug)]
pub struct Host {
    pub dir: tempfile::TempDir,
    pub driver: LocalDriver,
    pub images: ImageStore,
    pub image: Image,
}

impl Host {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("pd").tempdir().unwrap();
        let cfg = LocalConfig::for_data_dir(dir.path());
        let driver = LocalDriver::new(cfg).unwrap();
        let images = ImageStore::new(dir.path().join("images"));
        let image = images.build_minimal(&driver.config().launcher).unwrap();
        Self {
            dir,
            driver,
            images,
            image,
        }
    }

    pub fn spec(&self) -> SandboxSpec {
        SandboxSpec {
            template: "minimal".into(),
            limits: Default::default(),
            network: Default::default(),
            env: vec![],
            labels: [("user".to_owned(), "test".to_owned())].into(),
            ttl: Duration::from_secs(60),
            egress: None,
            egress_auth: None,
        }
    }

    pub async fn boot(&self, spec: &SandboxSpec) -> SandboxId {
        let id = SandboxId::generate();
        self.driver
            .create(&id, spec, &self.image, Duration::from_secs(10))
            .await
            .unwrap();
        id
    }

    /// Runs a shell line inside; (exit code, stdout, stderr).
    pub async fn sh(&self, id: &SandboxId, line: &str) -> (Option<i32>, String, String) {
        let mut agent = self.driver.agent(id, Duration::from_secs(5)).await.unwrap();
        let out = agent
            .exec(
                &["/bin/sh", "-c", line],
                None,
                Duration::from_secs(30),
                |_| {},
            )
            .await
            .unwrap();
        (
            out.code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Whatever a failed test left: kill and remove it, and our parents.
        let _ = self.driver.cgroups().remove_all(Duration::from_secs(5));
    }
}
