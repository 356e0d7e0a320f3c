//! Finding and reading the config files, with systemd's drop-in semantics.
//!
//! Drop-ins are the `*.toml` files of the drop-in directories. A name in a later directory
//! masks the same name in an earlier one; an empty file or a symlink to `/dev/null` masks it
//! away. The survivors apply in byte order of file name, after the main file. Hidden files
//! (editor lock files such as `.#20-site.toml`) and anything that is not a regular file are
//! skipped, as systemd does.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{ConfigError, ConfigPaths};

/// The (path, text) of every file that applies, main first; masks are left out. A missing main
/// file or drop-in directory is not an error; an unreadable one is.
pub(super) fn read_all(paths: &ConfigPaths) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    let mut out = Vec::new();
    match fs::read_to_string(&paths.main) {
        Ok(text) => out.push((paths.main.clone(), text)),
        // An image may ship only drop-ins.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(path = %paths.main.display(), "no main config file");
        }
        Err(source) => {
            return Err(ConfigError::ReadFile {
                path: paths.main.clone(),
                source,
            });
        }
    }
    for dropin in dropins(&paths.dropin_dirs)? {
        match dropin {
            Dropin::Mask(path) => tracing::debug!(path = %path.display(), "config drop-in masked"),
            Dropin::File(path) => {
                let text = fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
                out.push((path, text));
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Dropin {
    File(PathBuf),
    /// A symlink to `/dev/null`: masks the same name in earlier directories.
    Mask(PathBuf),
}

/// The drop-ins that apply, in the order they apply.
fn dropins(dirs: &[PathBuf]) -> Result<Vec<Dropin>, ConfigError> {
    let mut by_name: BTreeMap<OsString, Dropin> = BTreeMap::new();
    for dir in dirs {
        let listing = match fs::read_dir(dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(ConfigError::ReadDir {
                    path: dir.clone(),
                    source,
                });
            }
        };
        for entry in listing {
            let entry = entry.map_err(|source| ConfigError::ReadDir {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let visible_toml = name
                .to_str()
                .is_some_and(|n| n.ends_with(".toml") && !n.starts_with('.'));
            if !visible_toml {
                continue;
            }
            let path = entry.path();
            if let Some(dropin) = classify(&path) {
                // A later directory replaces an earlier one's file of the same name.
                by_name.insert(name, dropin);
            }
        }
    }
    Ok(by_name.into_values().collect())
}

/// What a directory entry is, or `None` for entries that are ignored.
fn classify(path: &Path) -> Option<Dropin> {
    if fs::read_link(path).is_ok_and(|target| target == Path::new("/dev/null")) {
        return Some(Dropin::Mask(path.to_path_buf()));
    }
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.len() == 0 => Some(Dropin::Mask(path.to_path_buf())),
        Ok(meta) if meta.is_file() => Some(Dropin::File(path.to_path_buf())),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "ignoring config drop-in: not a regular file");
            None
        }
        Err(error) => {
            // A dangling symlink: systemd ignores it too, but it is likely a mistake.
            tracing::warn!(path = %path.display(), %error, "ignoring config drop-in");
            None
        }
    }
}
