//! `polydev-agent --socket PATH`: serves the agent protocol on PATH (inside
//! a sandbox; prints `polydev-agent ready` on stdout once it listens).
//! `polydev-agent launch SPEC.json`: the host-side privileged steps that
//! start a sandbox (see `polydev_agent::launch`).

use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--socket", path] => serve(path, None),
        ["--socket", path, "--egress-relay", addr] => match addr.parse() {
            Ok(a) => serve(path, Some(a)),
            Err(_) => {
                eprintln!("polydev-agent: --egress-relay needs IP:PORT, got {addr:?}");
                ExitCode::from(2)
            }
        },
        ["launch", spec] => launch(spec),
        _ => {
            eprintln!("usage: polydev-agent --socket PATH [--egress-relay IP:PORT] | polydev-agent launch SPEC.json");
            ExitCode::from(2)
        }
    }
}

fn launch(path: &str) -> ExitCode {
    let spec: polydev_agent::launch::LaunchSpec = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("polydev-agent launch: cannot read {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let err = polydev_agent::launch::launch(&spec);
    eprintln!("polydev-agent launch: {err}");
    ExitCode::FAILURE
}

fn serve(socket: &str, relay: Option<std::net::SocketAddr>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("polydev-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = std::path::Path::new(socket);
    let work = async {
        if let Some(listen) = relay {
            // The controller's end sits beside the agent's socket.
            let to = path.with_file_name("egress.sock");
            polydev_agent::server::relay_egress(listen, to).await?;
        }
        Arc::new(polydev_agent::Agent::default()).serve(path).await
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("polydev-agent: cannot serve on {socket}: {e}");
            ExitCode::FAILURE
        }
    }
}
