//! Records the git commit the binary was built from (`polydev_build_info`,
//! deployment records). `POLYDEV_GIT_SHA` overrides it for builds outside a
//! git checkout.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=POLYDEV_GIT_SHA");
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs/heads");
    let sha = std::env::var("POLYDEV_GIT_SHA").ok().unwrap_or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=7", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned())
    });
    println!("cargo:rustc-env=POLYDEV_GIT_SHA={sha}");
}
