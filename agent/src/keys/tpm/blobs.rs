//! The tpm backend's files: TPM2B_PUBLIC / TPM2B_PRIVATE in tpm2-tools' framing (what
//! `tpm2_create -u key.pub -r key.priv` writes: a 2-byte big-endian size, then the structure),
//! written the way the file backend writes keys: temporary file, fsync, rename; the directory
//! is synced once for all of a generation's files (`Store::sync_generation`).
//!
//! tss-esapi marshals a `Public` as TPMT_PUBLIC and gives a `Private` as its bare buffer; the
//! size prefix is added and checked here, so that the files are byte for byte what tpm2-tools
//! reads and writes.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{Private, Public};
use tss_esapi::traits::{Marshall, UnMarshall};

/// TPM2B_PUBLIC of the key (public, and also what identifies a persistent key).
pub(crate) const PUBLIC_FILE: &str = "key.pub";
/// TPM2B_PRIVATE of the key: the private key wrapped (encrypted and integrity-protected) by
/// the parent, useless outside this TPM.
pub(crate) const PRIVATE_FILE: &str = "key.priv";
/// In persistent-handle mode: the handle ("0x81010001\n") the key of this generation was put at.
pub(crate) const HANDLE_FILE: &str = "key.handle";
/// Every file name the backend writes, temporaries included, for removal.
pub(crate) const ALL_FILES: [&str; 6] = [
    HANDLE_FILE,
    PUBLIC_FILE,
    PRIVATE_FILE,
    ".key.handle.tmp",
    ".key.pub.tmp",
    ".key.priv.tmp",
];

/// TPM_ALG_SHA256, the name algorithm of the keys this backend makes.
const TPM_ALG_SHA256: [u8; 2] = [0x00, 0x0B];

/// `body` with its 2-byte big-endian size in front (a TPM2B).
fn frame(body: &[u8]) -> Result<Vec<u8>, String> {
    let size = u16::try_from(body.len())
        .map_err(|_| format!("{} bytes is too long for a TPM2B", body.len()))?;
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// The body of a TPM2B that must fill `bytes` exactly.
fn unframe<'a>(bytes: &'a [u8], what: &str) -> Result<&'a [u8], String> {
    let Some((size, body)) = bytes.split_first_chunk::<2>() else {
        return Err(format!("not a {what}: {} bytes", bytes.len()));
    };
    let size = usize::from(u16::from_be_bytes(*size));
    if size != body.len() || size == 0 {
        return Err(format!(
            "not a {what}: its size field says {size} bytes, {} follow",
            body.len()
        ));
    }
    Ok(body)
}

/// The TPM2B_PUBLIC file contents of `public`.
pub(crate) fn encode_public(public: &Public) -> Result<Vec<u8>, String> {
    frame(
        &public
            .marshall()
            .map_err(|e| format!("encoding TPMT_PUBLIC: {e}"))?,
    )
}

/// Parses a TPM2B_PUBLIC file. The structure must be exactly canonical (re-encoding gives the
/// same bytes), so trailing garbage or a damaged file is caught here, not by the TPM.
pub(crate) fn decode_public(bytes: &[u8]) -> Result<Public, String> {
    const WHAT: &str = "TPM2B_PUBLIC";
    let body = unframe(bytes, WHAT)?;
    let public = Public::unmarshall(body).map_err(|e| format!("not a {WHAT}: {e}"))?;
    match public.marshall() {
        Ok(again) if again == body => Ok(public),
        _ => Err(format!(
            "not a {WHAT}: it does not decode to exactly its {} bytes",
            body.len()
        )),
    }
}

/// The TPM2B_PRIVATE file contents of `private`.
pub(crate) fn encode_private(private: &Private) -> Result<Vec<u8>, String> {
    frame(private.value())
}

/// Parses a TPM2B_PRIVATE file.
pub(crate) fn decode_private(bytes: &[u8]) -> Result<Private, String> {
    const WHAT: &str = "TPM2B_PRIVATE";
    let body = unframe(bytes, WHAT)?;
    Private::try_from(body.to_vec()).map_err(|e| format!("not a {WHAT}: {e}"))
}

/// The TPM Name of an object with public area `public` (nameAlg || H(TPMT_PUBLIC)): what the
/// TPM reports for the object at a persistent handle, so it tells our key from any other.
pub(crate) fn name_of(public: &Public) -> Result<Vec<u8>, String> {
    if public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
        return Err("the key's name algorithm is not SHA-256".into());
    }
    let body = public
        .marshall()
        .map_err(|e| format!("encoding TPMT_PUBLIC: {e}"))?;
    let mut name = TPM_ALG_SHA256.to_vec();
    name.extend_from_slice(&Sha256::digest(&body));
    Ok(name)
}

/// "0x81010001\n" for the handle file.
pub(crate) fn encode_handle(handle: u32) -> Vec<u8> {
    format!("{handle:#010x}\n").into_bytes()
}

pub(crate) fn decode_handle(bytes: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(bytes).unwrap_or_default().trim();
    text.strip_prefix("0x")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .filter(|h| (0x8100_0000..=0x81FF_FFFF).contains(h))
        .ok_or_else(|| format!("not a persistent handle: {text:?}"))
}

/// Reads `path`; `None` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Creates `<state>/gen/` and `<state>/gen/<n>/` (0700, like the file backend's: the
/// certificate lands there too) if missing; the new entries become durable with the
/// generation's files (`Store::sync_generation`). Errors come with the path that failed.
pub(crate) fn ensure_generation_dir(
    state_dir: &Path,
    generation_dir: &Path,
) -> Result<(), (PathBuf, io::Error)> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|e| (state_dir.to_path_buf(), e))?;
    let gen_root = state_dir.join("gen");
    for dir in [gen_root.as_path(), generation_dir] {
        match fs::DirBuilder::new().mode(0o700).create(dir) {
            // Made durable with the generation's files by `Store::sync_generation`.
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err((dir.to_path_buf(), e)),
        }
    }
    Ok(())
}

/// Writes `bytes` to `<dir>/<name>` atomically and durably, mode 0644: the blobs are public or
/// wrapped by the TPM, and other programs of the gateway (tpm2-tools) may read them. The
/// directory's fsync is left to the caller, which writes several files and syncs once.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<(), (PathBuf, io::Error)> {
    let path = dir.join(name);
    // One fixed temporary name per file: a stale one (power cut mid-write) is removed first,
    // and a concurrent writer fails on create_new instead of mixing files.
    let temp = dir.join(format!(".{name}.tmp"));
    remove_if_exists(&temp).map_err(|e| (temp.clone(), e))?;
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err((temp, e));
    }
    if let Err(e) = fs::rename(&temp, &path) {
        let _ = fs::remove_file(&temp);
        return Err((path, e));
    }
    Ok(())
}

pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(crate) use crate::keys::sync_dir;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tpm2b_framing_is_checked() {
        assert_eq!(frame(&[1, 2, 3]).unwrap(), vec![0, 3, 1, 2, 3]);
        assert_eq!(unframe(&[0, 3, 1, 2, 3], "x").unwrap(), &[1, 2, 3]);
        assert!(
            unframe(&[0, 4, 1, 2, 3], "x")
                .unwrap_err()
                .contains("says 4 bytes, 3 follow")
        );
        assert!(unframe(&[0, 2, 1, 2, 3], "x").is_err());
        assert!(unframe(&[0], "x").is_err());
        assert!(unframe(&[0, 0], "x").is_err());
        assert!(frame(&vec![0; 70_000]).is_err());
    }

    #[test]
    fn garbage_is_not_a_public_area() {
        let err = decode_public(&[0, 4, 0xde, 0xad, 0xbe, 0xef]).unwrap_err();
        assert!(err.starts_with("not a TPM2B_PUBLIC"), "{err}");
        let err = decode_private(b"").unwrap_err();
        assert!(err.starts_with("not a TPM2B_PRIVATE"), "{err}");
    }

    #[test]
    fn handle_files_round_trip() {
        assert_eq!(encode_handle(0x8101_0001), b"0x81010001\n");
        assert_eq!(decode_handle(b"0x81010001\n").unwrap(), 0x8101_0001);
        assert!(decode_handle(b"0x01000001").is_err());
        assert!(decode_handle(b"81010001").is_err());
        assert!(decode_handle(&[0xff]).is_err());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".key.pub.tmp"), b"stale").unwrap();
        write_atomic(dir.path(), PUBLIC_FILE, b"one").unwrap();
        write_atomic(dir.path(), PUBLIC_FILE, b"two").unwrap();
        assert_eq!(fs::read(dir.path().join(PUBLIC_FILE)).unwrap(), b"two");
        assert!(!dir.path().join(".key.pub.tmp").exists());
        assert_eq!(
            fs::metadata(dir.path().join(PUBLIC_FILE)).unwrap().mode() & 0o777,
            0o644
        );
    }
}
