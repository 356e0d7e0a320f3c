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

/// The (path, text) of every file that applies, main first; masks are left out. A missing
/// drop-in directory is not an error, and neither is a missing main file unless
/// [`ConfigPaths::main_required`]; an unreadable one is.
pub(super) fn read_all(paths: &ConfigPaths) -> Result<Vec<(PathBuf, String)>, ConfigError> {
    let mut out = Vec::new();
    match read_text(&paths.main) {
        Ok(text) => out.push((paths.main.clone(), text)),
        Err(ConfigError::ReadFile { error, .. })
            if error.kind() == io::ErrorKind::NotFound && paths.main_required =>
        {
            return Err(ConfigError::MissingFile {
                path: paths.main.clone(),
            });
        }
        // An image may ship only drop-ins.
        Err(ConfigError::ReadFile { error, .. }) if error.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(path = %paths.main.display(), "no main config file");
        }
        Err(error) => return Err(error),
    }
    for dropin in dropins(&paths.dropin_dirs)? {
        match dropin {
            Dropin::Mask(path) => tracing::debug!(path = %path.display(), "config drop-in masked"),
            Dropin::File(path) => {
                let text = read_text(&path)?;
                out.push((path, text));
            }
        }
    }
    Ok(out)
}

/// A file's text. Not UTF-8 is reported with the place of the first bad byte: an editor set
/// to Latin-1 changes only the odd character, which is hard to find from "invalid data".
fn read_text(path: &Path) -> Result<String, ConfigError> {
    let bytes = fs::read(path).map_err(|error| ConfigError::ReadFile {
        path: path.to_path_buf(),
        error,
    })?;
    String::from_utf8(bytes).map_err(|error| {
        let bytes = error.as_bytes();
        let valid_up_to = error.utf8_error().valid_up_to();
        // The prefix up to the bad byte is valid UTF-8 by definition.
        let before = std::str::from_utf8(&bytes[..valid_up_to]).unwrap_or_default();
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        ConfigError::NotUtf8 {
            path: path.to_path_buf(),
            byte: bytes.get(valid_up_to).copied().unwrap_or_default(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    })
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
            Err(error) => {
                return Err(ConfigError::ReadDir {
                    path: dir.clone(),
                    error,
                });
            }
        };
        for entry in listing {
            let entry = entry.map_err(|error| ConfigError::ReadDir {
                path: dir.clone(),
                error,
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
