//! A benchmark interrupted mid-way ends what it started: `polydev-bench
//! load` (the area that starts the most: a server, sandboxes, CLIs, login
//! sessions) gets SIGTERM while its runs are in flight; it exits, its
//! server process is gone, the server's sandbox cgroups are gone and so is
//! its data directory. Needs root (sandboxes) and the `polydev` binary
//! beside the bench's (scripts/test.sh builds both).

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The processes whose parent is `pid`, with their command lines.
fn children(pid: u32) -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // The parent is the second field after the command's closing paren.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            let args = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            out.push((child, args));
        }
    }
    out
}

/// Stops the bench if the test fails before it ended (its own SIGTERM
/// handling then ends what it started); disarmed once it has exited, so
/// no other process that got its pid is ever signalled.
struct Stop(Option<u32>);

impl Drop for Stop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

#[test]
fn an_interrupted_load_test_leaves_nothing_behind() {
    let bench = env!("CARGO_BIN_EXE_polydev-bench");
    let mut child = std::process::Command::new(bench)
        .args([
            "load",
            "--duration-secs",
            "600",
            "--load-clients",
            "5",
            "--load-runs",
            "2",
            "--load-logins",
            "1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the bench starts");
    let pid = child.id();
    let mut stop = Stop(Some(pid));
    // Its server, once it is up and has sandboxes (runs and logins going).
    let deadline = Instant::now() + Duration::from_secs(90);
    let (server, data_dir) = loop {
        assert!(
            Instant::now() < deadline,
            "the bench's server never came up"
        );
        // Its `polydev serve` (not a `polydev user add` beside it).
        let found = children(pid).into_iter().find_map(|(p, args)| {
            args.iter().any(|a| a == "serve").then_some(())?;
            let i = args.iter().position(|a| a == "--data-dir")?;
            Some((p, PathBuf::from(args.get(i + 1)?)))
        });
        if let Some((p, dir)) = found {
            let cfg = polydev_sandbox::LocalConfig::for_data_dir(&dir);
            let live = polydev_sandbox::cgroup::Cgroups::detect(&cfg.cgroup_root, &cfg.instance)
                .map(|c| c.list().len())
                .unwrap_or(0);
            // The pool of 4 plus a run or a login of its own.
            if live >= 5 {
                break (p, dir);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let cfg = polydev_sandbox::LocalConfig::for_data_dir(&data_dir);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            stop.0 = None;
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the bench did not stop within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    use std::io::Read;
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(!status.success(), "an interrupted bench says so: {err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        !std::path::Path::new(&format!("/proc/{server}")).exists()
            || std::fs::read_to_string(format!("/proc/{server}/stat"))
                .unwrap_or_default()
                .contains(") Z"),
        "its server (pid {server}) is still running"
    );
    // (Looking makes the instance's empty parent again: it goes after.)
    let cgroups = polydev_sandbox::cgroup::Cgroups::detect(&cfg.cgroup_root, &cfg.instance);
    let left = cgroups.as_ref().map(|c| c.list()).unwrap_or_default();
    if let Ok(c) = &cgroups {
        c.remove_parent_if_empty();
    }
    assert!(left.is_empty(), "sandboxes left: {left:?}");
    assert!(!data_dir.exists(), "{} is left", data_dir.display());
}
