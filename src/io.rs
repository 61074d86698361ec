//! Files we write appear complete or not at all: written under a temporary name in the target
//! folder, fsynced, then renamed. Also checksums for provenance.
use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A file being written atomically. Dropped without [`AtomicFile::commit`], it vanishes.
pub struct AtomicFile {
    tmp: tempfile::TempPath,
    target: PathBuf,
}

impl AtomicFile {
    /// Prepares to write `target`. Fails if its folder does not exist, or if `target` exists
    /// and `overwrite` is false (so an existing corpus is never replaced by accident).
    pub fn new(target: &Path, overwrite: bool) -> Result<Self> {
        let dir = parent_dir(target);
        if !dir.is_dir() {
            bail!(
                "{}: output folder {} does not exist",
                target.display(),
                dir.display()
            );
        }
        if target.exists() && !overwrite {
            bail!(
                "{}: already exists (use --force to overwrite)",
                target.display()
            );
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .tempfile_in(dir)
            .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?
            .into_temp_path();
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
        })
    }

    /// Where to write the contents before [`AtomicFile::commit`].
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes the temporary file to disk and renames it onto the target.
    pub fn commit(self) -> Result<()> {
        // Temporary files are created owner-only; the result should be readable like any
        // file the user would create (0666 less the umask, as `open(2)` would give).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = 0o666 & !current_umask();
            std::fs::set_permissions(&self.tmp, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("{}: cannot set permissions", self.tmp.display()))?;
        }
        File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: fsync failed", self.tmp.display()))?;
        self.tmp
            .persist(&self.target)
            .with_context(|| format!("{}: cannot rename into place", self.target.display()))?;
        if let Ok(dir) = File::open(parent_dir(&self.target)) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Writes `bytes` to `target` atomically.
pub fn write_atomic(target: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let file = AtomicFile::new(target, overwrite)?;
    File::create(file.path())
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| format!("{}: write failed", file.path().display()))?;
    file.commit()
}

/// The process umask, read without changing it (from /proc; 0o022 when unavailable).
#[cfg(unix)]
fn current_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// BLAKE3 of a file's bytes, as hex.
pub fn file_checksum(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read failed", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// BLAKE3 of bytes already in memory, as hex.
pub fn bytes_checksum(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_file_is_readable_by_others_and_uncommitted_vanishes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.bin");
        write_atomic(&target, b"abc", false).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o644, 0o644 & !current_umask(), "mode {mode:o}");
        }
        assert!(write_atomic(&target, b"xyz", false).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"abc");
        let pending = AtomicFile::new(&dir.path().join("b.bin"), false).unwrap();
        std::fs::write(pending.path(), b"half").unwrap();
        drop(pending);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
