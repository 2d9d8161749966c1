//! Golden images: read-only root filesystems, one directory per content
//! hash, per template, with `current` and `previous` symlinks swapped
//! atomically (rename of a fresh symlink over the old one).
//!
//! ```text
//! <images>/<template>/<hash>/rootfs/         the tree (lower layer of every overlay)
//! <images>/<template>/<hash>/manifest.json   template, hash, host binds, build time
//! <images>/<template>/current -> <hash>
//! <images>/<template>/previous -> <hash>
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Where the agent lives in every image.
pub const AGENT_PATH: &str = "/.polydev/agent";
/// Mount points bwrap needs to find in the image (it cannot create them:
/// the root is read-only to the unprivileged sandbox user).
const MOUNT_POINTS: [&str; 6] = [
    "proc",
    "dev",
    "run/polydev",
    "home/sandbox",
    "tmp",
    ".polydev",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub template: String,
    pub hash: String,
    /// Host directories bound read-only at the same place (the `minimal`
    /// template borrows the host's /usr; real templates bring their own).
    #[serde(default)]
    pub host_binds: Vec<String>,
    pub built_at: String,
    #[serde(default)]
    pub validated: bool,
    /// The CLIs' npm packages (`package@version`) it was built with, for a
    /// template that carries them: an image built with other pins is
    /// stale, and a start prepares it anew.
    #[serde(default)]
    pub cli_packages: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub manifest: Manifest,
    pub rootfs: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("no image for template `{0}`: build one with `polydev image build {0}`")]
    NoImage(String),
    #[error("template `{template}` has no image {hash}")]
    NoSuchHash { template: String, hash: String },
    #[error("unknown template `{0}` (known: minimal, base, runtime, browser)")]
    UnknownTemplate(String),
    #[error("{0}")]
    Build(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn valid_template(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl ImageStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn template_dir(&self, template: &str) -> Result<PathBuf, ImageError> {
        if !valid_template(template) {
            return Err(ImageError::UnknownTemplate(template.to_owned()));
        }
        Ok(self.dir.join(template))
    }

    fn load(&self, template: &str, hash: &str) -> Result<Image, ImageError> {
        let dir = self.template_dir(template)?.join(hash);
        let manifest: Manifest = std::fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ImageError::NoSuchHash {
                template: template.to_owned(),
                hash: hash.to_owned(),
            })?;
        Ok(Image {
            manifest,
            rootfs: dir.join("rootfs"),
        })
    }

    fn link(&self, template: &str, name: &str) -> Option<String> {
        let dir = self.template_dir(template).ok()?;
        let target = std::fs::read_link(dir.join(name)).ok()?;
        Some(target.to_string_lossy().into_owned())
    }

    /// The active image of a template.
    pub fn current(&self, template: &str) -> Result<Image, ImageError> {
        let hash = self
            .link(template, "current")
            .ok_or_else(|| ImageError::NoImage(template.to_owned()))?;
        self.load(template, &hash)
    }

    /// Every built image of a template, with which one is current.
    pub fn list(&self, template: &str) -> Result<Vec<(Image, bool)>, ImageError> {
        let dir = self.template_dir(template)?;
        let current = self.link(template, "current");
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && !name.starts_with('.') {
                    if let Ok(img) = self.load(template, &name) {
                        let is_current = current.as_deref() == Some(name.as_str());
                        out.push((img, is_current));
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.manifest.built_at.cmp(&b.0.manifest.built_at));
        Ok(out)
    }

    /// Templates that have an image.
    pub fn templates(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| valid_template(n) && self.link(n, "current").is_some())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    fn swap_link(&self, template: &str, name: &str, hash: &str) -> Result<(), ImageError> {
        let dir = self.template_dir(template)?;
        let tmp = dir.join(format!(".{name}.{}", rand::random::<u32>()));
        std::os::unix::fs::symlink(hash, &tmp)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    }

    /// Makes `hash` current, keeping the one before as `previous`.
    pub fn activate(&self, template: &str, hash: &str) -> Result<Image, ImageError> {
        let image = self.load(template, hash)?;
        if let Some(old) = self.link(template, "current") {
            if old != hash {
                self.swap_link(template, "previous", &old)?;
            }
        }
        self.swap_link(template, "current", hash)?;
        Ok(image)
    }

    /// Swaps `current` and `previous`.
    pub fn rollback(&self, template: &str) -> Result<Image, ImageError> {
        let previous = self.link(template, "previous").ok_or_else(|| {
            ImageError::Build(format!(
                "template `{template}` has no previous image to roll back to"
            ))
        })?;
        self.activate(template, &previous)
    }

    pub fn mark_validated(&self, image: &Image) -> Result<(), ImageError> {
        let mut m = image.manifest.clone();
        m.validated = true;
        let dir = self.template_dir(&m.template)?.join(&m.hash);
        write_json(&dir.join("manifest.json"), &m)
    }

    /// Moves a finished tree into the store under its content hash (an
    /// identical image already there is reused). Not activated.
    pub fn import(
        &self,
        template: &str,
        rootfs: &Path,
        host_binds: Vec<String>,
        cli_packages: Vec<String>,
    ) -> Result<Image, ImageError> {
        let tdir = self.template_dir(template)?;
        std::fs::create_dir_all(&tdir)?;
        for p in MOUNT_POINTS {
            std::fs::create_dir_all(rootfs.join(p))?;
        }
        let mut h = Sha256::new();
        h.update(template.as_bytes());
        for b in &host_binds {
            h.update(b.as_bytes());
            h.update([0]);
        }
        hash_tree(rootfs, rootfs, &mut h)?;
        let hash = hex::encode(&h.finalize()[..8]);
        let dest = tdir.join(&hash);
        if dest.join("manifest.json").exists() {
            let _ = std::fs::remove_dir_all(rootfs);
            return self.load(template, &hash);
        }
        let staging = tdir.join(format!(".staging-{hash}-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&staging)?;
        std::fs::rename(rootfs, staging.join("rootfs"))?;
        let manifest = Manifest {
            template: template.to_owned(),
            hash: hash.clone(),
            host_binds,
            built_at: now_rfc3339(),
            validated: false,
            cli_packages,
        };
        write_json(&staging.join("manifest.json"), &manifest)?;
        std::fs::rename(&staging, &dest)?;
        self.load(template, &hash)
    }

    /// A fresh working directory for a build, inside the store (so the
    /// final rename stays on one filesystem).
    pub fn scratch(&self, template: &str) -> Result<PathBuf, ImageError> {
        let dir = self
            .template_dir(template)?
            .join(format!(".build-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// `minimal`: a skeleton that borrows the host's /usr read-only, plus
    /// the agent. Builds in milliseconds, needs no network; for tests and
    /// for hosts without a Debian mirror.
    pub fn build_minimal(&self, agent: &Path) -> Result<Image, ImageError> {
        let work = self.scratch("minimal")?;
        let root = work.join("rootfs");
        std::fs::create_dir_all(root.join("usr"))?;
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(target, root.join(link))?;
        }
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nsandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        )?;
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n",
        )?;
        std::fs::write(
            root.join("etc/hosts"),
            "127.0.0.1 localhost sandbox\n::1 localhost\n",
        )?;
        add_agent(&root, agent)?;
        // The host's installed software: /usr, and the package configuration
        // programs there read (alternatives links, fonts, Chromium's flags,
        // the certificate authorities TLS clients trust).
        let mut binds = vec!["/usr".to_owned()];
        for extra in [
            "/etc/alternatives",
            "/etc/fonts",
            "/etc/chromium.d",
            "/etc/ssl/certs",
        ] {
            if Path::new(extra).is_dir() {
                // The mount point exists in the image: the sandbox's user
                // cannot make it in a root-owned /etc.
                std::fs::create_dir_all(root.join(extra.trim_start_matches('/')))?;
                binds.push(extra.to_owned());
            }
        }
        let image = self.import("minimal", &root, binds, Vec::new());
        let _ = std::fs::remove_dir_all(&work);
        image
    }
}

/// Copies the agent binary into a tree at `AGENT_PATH`.
pub fn add_agent(root: &Path, agent: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let dest = root.join(AGENT_PATH.trim_start_matches('/'));
    if let Some(p) = dest.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::copy(agent, &dest).map_err(|e| {
        ImageError::Build(format!(
            "cannot copy the agent from {}: {e}",
            agent.display()
        ))
    })?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ImageError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ImageError::Build(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// Hashes names, modes, file contents and link targets, in sorted order.
fn hash_tree(base: &Path, dir: &Path, h: &mut Sha256) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    let mut buf = vec![0u8; 64 * 1024];
    for e in entries {
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let rel = path.strip_prefix(base).unwrap_or(&path);
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(meta.mode().to_le_bytes());
        if meta.file_type().is_symlink() {
            h.update(std::fs::read_link(&path)?.as_os_str().as_encoded_bytes());
        } else if meta.is_dir() {
            hash_tree(base, &path, h)?;
        } else if meta.is_file() {
            let mut f = std::fs::File::open(&path)?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(())
}
