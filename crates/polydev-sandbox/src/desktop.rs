//! The login desktop the `browser` template carries: Xvnc on the
//! sandbox's VNC service socket and a kiosk Chromium, started by a shell
//! line through the agent. Login sessions start it (warm pools ahead of
//! time) and image validation checks it greets; nothing here knows a CLI.

use std::time::Duration;

use crate::driver::Driver;
use crate::spec::SandboxId;

/// The service socket of the login desktop's VNC server.
pub const VNC_SERVICE: &str = "vnc.sock";

/// Where the desktop's opener lives (inside the sandbox).
pub const OPENER_DIR: &str = "/tmp/polydev-bin";
/// Where the login desktop writes its output (inside the sandbox).
pub const DESKTOP_LOG: &str = "/tmp/polydev-desktop.log";
/// Appears when the login desktop died (inside the sandbox).
pub const DESKTOP_FAILED: &str = "/tmp/polydev-desktop.failed";
const DESKTOP_STARTED: &str = "/tmp/polydev-desktop.started";

/// Starts the login desktop in the background (its output in
/// `/tmp/polydev-desktop.log`; `/tmp/polydev-desktop.failed` appears if it
/// dies) and returns at once; a second call does nothing. What a warm
/// pool runs in its browser sandboxes ahead of time.
pub fn desktop_command(width: u32, height: u32) -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "[ -e {DESKTOP_STARTED} ] && exit 0; : > {DESKTOP_STARTED}; ( (\n{}\n) || : > {DESKTOP_FAILED} ) > {DESKTOP_LOG} 2>&1 < /dev/null &",
            desktop_script(width, height)
        ),
    ]
}
/// The opener (`$BROWSER`, `xdg-open`) that hands URLs to the desktop's Chromium.
pub const OPENER: &str = "/tmp/polydev-bin/xdg-open";

/// The login desktop: Xvnc on the service socket (no TCP; the sandbox's
/// network namespace has no peers anyway), then Chromium with a fresh
/// profile through the sandbox's egress proxy, kiosk-style, and an opener
/// (`$BROWSER`, `xdg-open`) that hands URLs to that Chromium.
pub fn desktop_script(width: u32, height: u32) -> String {
    let flags = "--no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run --no-default-browser-check --disable-background-networking --disable-component-update --disable-sync --disable-quic --disable-features=Translate,MediaRouter --password-store=basic --user-data-dir=/tmp/polydev-chromium --proxy-server=http://127.0.0.1:3128";
    format!(
        r#"export DISPLAY=:0
mkdir -p {OPENER_DIR} /tmp/polydev-chromium
browser=/usr/lib/chromium/chromium
[ -x $browser ] || browser=$(command -v chromium) || {{ echo "this image has no Chromium" >&2; exit 127; }}
# The opener waits for the kiosk Chromium's profile lock, so a URL a CLI
# opens early lands in that window (not in a second, hidden browser).
printf '#!/bin/sh\ni=0\nwhile [ ! -L /tmp/polydev-chromium/SingletonSocket ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\nexec %s {flags} "$@" >/dev/null 2>&1\n' "$browser" > {OPENER}
chmod 755 {OPENER}
xvnc=$(command -v Xvnc || command -v Xtigervnc) || {{ echo "this image has no VNC server (TigerVNC's Xvnc)" >&2; exit 127; }}
"$xvnc" :0 -rfbunixpath /run/polydev/{VNC_SERVICE} -rfbunixmode 0600 -rfbport -1 -nolisten tcp -SecurityTypes None -geometry {width}x{height} -depth 24 -UseBlacklist=0 -AlwaysShared -AcceptSetDesktopSize=0 -desktop polydev &
xpid=$!
i=0
while [ ! -S /run/polydev/{VNC_SERVICE} ]; do
  kill -0 $xpid 2>/dev/null || {{ echo "the VNC server exited" >&2; exit 1; }}
  [ $i -lt 1500 ] || {{ echo "the VNC server did not listen within 30 s" >&2; exit 1; }}
  sleep 0.02; i=$((i+1))
done
$browser {flags} --kiosk --window-position=0,0 --window-size={width},{height} 'data:text/html,<body style="font:24px sans-serif;padding:3em;background:%23f4f4f4">Waiting for the CLI to open its sign-in page&hellip;</body>' &
wait $xpid
"#
    )
}

/// Whether `stream` opens with the RFB banner (2 s at most).
pub async fn greets_as_vnc(mut stream: tokio::net::UnixStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut banner = [0u8; 12];
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut banner)).await;
    matches!(read, Ok(Ok(_))) && banner.starts_with(b"RFB ")
}

/// Whether the sandbox's login desktop answers on its VNC socket with the
/// RFB banner (2 s at most).
pub async fn vnc_greets(driver: &dyn Driver, sandbox: &SandboxId) -> bool {
    match driver.connect_service(sandbox, VNC_SERVICE).await {
        Ok(stream) => greets_as_vnc(stream).await,
        Err(_) => false,
    }
}
