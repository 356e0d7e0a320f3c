//! `iotctl onboarding register`: makes this gateway's setup code, writes the verifier record
//! (`onboarding.json` in the state directory, mode 0600, owned by user iotd) and prints the
//! label once. The code itself is stored nowhere: the label printed here is the only copy.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use iotd::config::ConfigPaths;
use iotd::onboard::code::{CodeError, SetupCode, check_serial, qr_payload};
use iotd::onboard::register::{OnboardingRecord, record_path};
use zeroize::Zeroizing;

use crate::exit;

/// The system user iotd runs as (packaging/systemd/iotd.sysusers), which must be able to read
/// the record.
const IOTD_USER: &str = "iotd";
/// Where systemd-sysusers and useradd keep system users.
const PASSWD: &str = "/etc/passwd";

/// `iotctl onboarding register [--replace]`.
pub fn register(paths: &ConfigPaths, replace: bool) -> anyhow::Result<u8> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "onboarding register must run as root: it writes the onboarding record into iotd's \
             state directory and gives it to user {IOTD_USER}"
        );
    }
    let settings = iotd::config::load(paths)?;
    let serial = settings.onboarding.resolve_serial()?.ok_or_else(|| {
        anyhow!(
            "onboarding.serial is not set: set it to the serial printed on this gateway's label \
             (a string, {{ file = \"path\" }} or {{ command = [\"program\"] }}) in {} or a \
             config.d drop-in",
            paths.main.display()
        )
    })?;
    check_serial(&serial).map_err(|error| serial_refused(&serial, &error))?;

    let owner = passwd_user(&read_passwd()?, IOTD_USER);
    let state_dir = &settings.state_dir;
    ensure_state_dir(state_dir, owner)?;
    let path = record_path(state_dir);
    let replaced = match fs::symlink_metadata(&path) {
        Ok(_) if !replace => bail!(
            "this gateway already has an onboarding registration ({}), to which the code on its \
             label belongs; run with --replace to make a new code (the old label is then void)",
            path.display()
        ),
        Ok(_) => true,
        Err(error) if error.kind() == io::ErrorKind::NotFound => false,
        Err(error) => {
            return Err(error).with_context(|| {
                format!("looking for an onboarding record at {}", path.display())
            });
        }
    };

    let (code, record) = OnboardingRecord::generate(&serial)?;
    record.write(&path, owner)?;
    let owner_note = match owner {
        Some(_) => format!("owner {IOTD_USER}"),
        None => format!(
            "owner root: there is no user {IOTD_USER} in {PASSWD}, so iotd cannot read it until \
             it is given to that user: chown {IOTD_USER}:{IOTD_USER} {}",
            path.display()
        ),
    };
    eprintln!("wrote {} (mode 0600, {owner_note})", path.display());
    if replaced {
        eprintln!(
            "the previous registration is replaced: the code on this gateway's old label no \
             longer works; put the new label on it"
        );
    }
    let label = label(&serial, &code)?;
    let mut out = io::stdout().lock();
    out.write_all(label.as_bytes())
        .and_then(|()| out.flush())
        .with_context(|| {
            format!(
                "printing the label after writing {}: the code is stored nowhere else, so run \
                 again with --replace to make a new one",
                path.display()
            )
        })?;
    Ok(exit::OK)
}

/// The label, as printed once: serial, code and QR payload.
fn label(serial: &str, code: &SetupCode) -> anyhow::Result<Zeroizing<String>> {
    let qr = qr_payload(serial, code)?;
    Ok(Zeroizing::new(format!(
        "Label of this gateway (printed once; the code is stored nowhere):\n\
         \x20 Serial:     {serial}\n\
         \x20 Setup code: {}\n\
         \x20 QR payload: {}\n",
        *code.formatted(),
        *qr
    )))
}

/// A resolved `onboarding.serial` that cannot be a serial, named by its key.
fn serial_refused(serial: &str, error: &CodeError) -> anyhow::Error {
    match error {
        CodeError::Serial { problem, .. } => {
            anyhow!("onboarding.serial resolved to {serial:?}, which cannot be a serial: {problem}")
        }
        other => anyhow!("onboarding.serial: {other}"),
    }
}

/// `/etc/passwd`; a system without one has no user iotd.
fn read_passwd() -> anyhow::Result<String> {
    match fs::read_to_string(PASSWD) {
        Ok(text) => Ok(text),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(error) => Err(error).with_context(|| format!("reading {PASSWD}")),
    }
}

/// The uid and gid of user `name` in passwd(5) text.
fn passwd_user(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next() != Some(name) {
            return None;
        }
        let _password = fields.next()?;
        let uid = fields.next()?.parse().ok()?;
        let gid = fields.next()?.parse().ok()?;
        Some((uid, gid))
    })
}

/// Makes the state directory when it is not there yet (mode 0700, given to iotd), as the
/// unit's StateDirectory= and the package's tmpfiles.d would: registration may run before iotd
/// ever started.
fn ensure_state_dir(dir: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).with_context(|| {
            format!(
                "giving state directory {} to user {IOTD_USER}",
                dir.display()
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    #[test]
    fn users_are_found_in_passwd_text() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      # a comment\n\
                      iotdx:x:5:5::/:/bin/false\n\
                      iotd:x:999:994:iotd gateway identity agent:/var/lib/iotd:/usr/sbin/nologin\n";
        assert_eq!(passwd_user(passwd, "iotd"), Some((999, 994)));
        assert_eq!(passwd_user(passwd, "root"), Some((0, 0)));
        assert_eq!(passwd_user(passwd, "nobody"), None);
        assert_eq!(passwd_user("iotd:x:abc:1::/:/x\n", "iotd"), None);
        assert_eq!(passwd_user("iotd:x\n", "iotd"), None);
        assert_eq!(passwd_user("", "iotd"), None);
    }

    #[test]
    fn read_passwd_reads_the_system_file() {
        // Every system this runs on has root.
        assert_eq!(passwd_user(&read_passwd().unwrap(), "root"), Some((0, 0)));
    }

    #[test]
    fn the_label_has_serial_code_and_qr_payload() {
        let code = SetupCode::parse("8271 9364 0518 2740").unwrap();
        assert_eq!(
            *label("IOTGW-0001234", &code).unwrap(),
            "Label of this gateway (printed once; the code is stored nowhere):\n  \
             Serial:     IOTGW-0001234\n  \
             Setup code: 8271-9364-0518-2740\n  \
             QR payload: IOTD1:IOTGW-0001234:8271936405182740\n"
        );
        assert!(label("GW:1", &code).is_err());
    }

    #[test]
    fn a_refused_serial_names_the_key() {
        let error = check_serial("GW 1").unwrap_err();
        assert_eq!(
            serial_refused("GW 1", &error).to_string(),
            "onboarding.serial resolved to \"GW 1\", which cannot be a serial: it has characters \
             other than printable ASCII (or spaces)"
        );
        assert_eq!(
            serial_refused("x", &CodeError::Random).to_string(),
            "onboarding.serial: generating a setup code: the system's random number generator \
             failed"
        );
    }

    #[test]
    fn a_missing_state_directory_is_made_closed_and_given_to_iotd() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/lib/iotd");
        let me = fs::metadata(tmp.path()).unwrap();
        ensure_state_dir(&dir, Some((me.uid(), me.gid()))).unwrap();
        let meta = fs::metadata(&dir).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!((meta.uid(), meta.gid()), (me.uid(), me.gid()));
        // An existing one is left as it is.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
        ensure_state_dir(&dir, None).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o750
        );
        // A file in the way.
        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        let error = ensure_state_dir(&file.join("state"), None).unwrap_err();
        assert!(
            format!("{error:#}").starts_with("creating state directory "),
            "{error:#}"
        );
    }
}
