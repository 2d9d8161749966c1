//! `polydev-agent --socket PATH`: serves the agent protocol on PATH.

use std::sync::Arc;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let socket = match (args.next().as_deref(), args.next()) {
        (Some("--socket"), Some(path)) => path,
        _ => {
            eprintln!("usage: polydev-agent --socket PATH");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("polydev-agent: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime
        .block_on(Arc::new(polydev_agent::Agent::default()).serve(std::path::Path::new(&socket)))
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("polydev-agent: cannot serve on {socket}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
