//! Files that must survive a crash: fsync of a new file's directory entry, and secret files
//! (the admin and master keys) created with mode 0600 and fsynced before they are used.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Makes a new file's directory entry durable.
pub fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("fsync of the directory {}", parent.display()))
}

/// Makes the entries of a directory durable (new files in it, renames into it).
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("fsync of the directory {}", dir.display()))
}

/// Reads a secret file, or creates it (mode 0600, fsynced, its directory entry too) from
/// `generate` when `create` is set and it does not exist. Warns when the file is readable by
/// others. The log names the file, never what it holds.
pub fn secret_file(
    path: &Path,
    what: &str,
    create: bool,
    generate: fn() -> String,
) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "the {what} file is readable by others; chmod 600 it");
            }
            tracing::info!(path = %path.display(), "{what} read from file");
            Ok(text)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && create => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let text = generate();
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            sync_parent(path)?;
            tracing::info!(path = %path.display(), "generated a new {what} (mode 0600)");
            Ok(text)
        }
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_is_created_once_with_mode_600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("secret");
        assert!(secret_file(&path, "test secret", false, || "x".into()).is_err());
        let made = secret_file(&path, "test secret", true, || "first".into()).unwrap();
        assert_eq!(made, "first");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = secret_file(&path, "test secret", true, || "second".into()).unwrap();
        assert_eq!(again, "first", "an existing file is never replaced");
    }
}
