//! Whole-or-nothing output files: everything pare writes goes to a temporary file beside the target
//! (same directory, so the same file system) and is renamed over it only once complete and synced.
//! An error or Ctrl-C in between leaves the target as it was.

use crate::{Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

/// `.NAME.tmp-PID` in the target's directory: the same file system, so the rename is atomic.
pub fn temp_path(target: &Path) -> Result<PathBuf> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("output path {} names no file", target.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(target.with_file_name(tmp_name))
}

/// Syncs the finished temporary file and renames it over `target`.
pub fn persist(tmp: &Path, target: &Path) -> Result<()> {
    File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, target).map_err(|e| Error::io(target, e))?;
    // The rename is durable only once the directory is synced; a failure here loses nothing
    // written, so it is not an error.
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `target` atomically.
pub fn write(target: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(target)?;
    let guard = RemoveOnDrop(Some(tmp.clone()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    persist(&tmp, target)?;
    guard.disarm();
    Ok(())
}

/// Removes a temporary file when dropped, unless disarmed after a successful [`persist`].
pub struct RemoveOnDrop(pub Option<PathBuf>);

impl RemoveOnDrop {
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_whole_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write(&p, b"first").unwrap();
        write(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-dir").join("out");
        assert!(write(&p, b"x").is_err());
        assert!(write(Path::new("/"), b"x").is_err());
    }
}
