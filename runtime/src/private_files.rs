//! Files and directories only their owner may use: data files `0600`,
//! directories `0700`, whatever the process's umask. Budgets, usage rows
//! and spooled usage records are nobody else's business on a shared host.
//! Permissions are set at creation; existing files and directories keep
//! what an operator gave them.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Mode of the files allot creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories allot creates.
pub const DIR_MODE: u32 = 0o700;

/// `create_dir_all`, each directory it creates `0700`.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder.create(path)
}

/// `File::create` (write, truncate), a new file `0600`.
pub fn create(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    options.open(path)
}

/// Creates `path` empty and `0600` unless it exists, so that a library
/// that creates its file itself (redb) finds it with the right mode.
pub fn create_if_missing(path: &Path) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, FILE_MODE);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_files_and_directories_are_the_owners_only() {
        let root = std::env::temp_dir().join(format!("allot-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let nested = root.join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&root), DIR_MODE);
        assert_eq!(mode(&nested), DIR_MODE);
        create(&nested.join("f")).unwrap();
        assert_eq!(mode(&nested.join("f")), FILE_MODE);
        create_if_missing(&nested.join("g")).unwrap();
        create_if_missing(&nested.join("g")).unwrap();
        assert_eq!(mode(&nested.join("g")), FILE_MODE);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
