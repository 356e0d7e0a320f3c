//! `iotctl onboarding register` as a black box: the record it writes (mode, owner, contents),
//! the label it prints (whose code must verify against the record), --replace, and its
//! refusals. It must run as root, as CI does; the owner is tested against a passwd file of the
//! test's own, bind-mounted over /etc/passwd in a private mount namespace (unshare), so that
//! the result does not depend on whether this machine has a user iotd.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::process::{Command, Output};

use common::{Dir, describe, iotctl, stderr, stdout};
use iotd::onboard::code::{SetupCode, parse_qr};
use iotd::onboard::register::{OnboardingRecord, derive_secret};

const ENDPOINT: &str = "a-ats.iot.eu-west-1.amazonaws.com";

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A test directory whose config sets `[onboarding]` to `onboarding` (TOML), and a passwd file
/// with `passwd_lines`.
fn setup(onboarding: &str, passwd_lines: &str) -> Dir {
    assert!(is_root(), "these tests run as root, as CI does");
    let dir = Dir::new();
    dir.write_config(ENDPOINT, 8883, "", &format!("[onboarding]\n{onboarding}\n"));
    std::fs::write(
        dir.path().join("passwd"),
        format!("root:x:0:0:root:/root:/bin/sh\n{passwd_lines}"),
    )
    .unwrap();
    dir
}

/// `iotctl --config … onboarding register args…` with the test's passwd file as /etc/passwd.
fn register(dir: &Dir, args: &[&str]) -> Output {
    let iotctl_command = dir.command(&[&["onboarding", "register"], args].concat());
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/passwd && exec \"$@\"")
        .arg(dir.path().join("passwd"))
        .arg(iotctl_command.get_program())
        .args(iotctl_command.get_args());
    for (key, value) in iotctl_command.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    command.output().unwrap()
}

/// The label's serial, code and QR payload, from the output.
fn label(out: &Output) -> (String, SetupCode, String) {
    let text = stdout(out);
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .to_owned()
    };
    let code = SetupCode::parse(&field("Setup code:")).unwrap();
    (field("Serial:"), code, field("QR payload:"))
}

/// Derives w0 ‖ L from the printed code and the record's salt and iterations, and compares it
/// with the stored record.
fn code_verifies(record: &OnboardingRecord, serial: &str, code: &SetupCode) -> bool {
    let again = derive_secret(code, serial, &record.salt, record.iterations)
        .unwrap()
        .record();
    again.to_bytes().unwrap()[..] == record.verifier.to_bytes().unwrap()[..]
}

#[test]
fn register_writes_a_record_that_the_printed_code_verifies() {
    let dir = setup(
        "serial = \"IOTGW-0001234\"",
        "iotd:x:4242:4343:iotd:/var/lib/iotd:/usr/sbin/nologin\n",
    );
    let out = register(&dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // The state directory did not exist: it was made, closed, and given to iotd.
    let state = std::fs::metadata(dir.state_dir()).unwrap();
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
    assert_eq!((state.uid(), state.gid()), (4242, 4343));

    let path = dir.state_dir().join("onboarding.json");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "{}",
        describe(&out)
    );
    assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "owned by iotd");
    assert!(
        stderr(&out).contains(&format!("wrote {} (mode 0600, owner iotd)", path.display())),
        "{}",
        describe(&out)
    );

    let (serial, code, qr) = label(&out);
    assert_eq!(serial, "IOTGW-0001234");
    assert_eq!(qr, format!("IOTD1:IOTGW-0001234:{}", code.digits()));
    let (qr_serial, qr_code) = parse_qr(&qr).unwrap();
    assert_eq!((qr_serial.as_str(), &qr_code), ("IOTGW-0001234", &code));
    assert!(
        stdout(&out).contains(&*code.formatted()),
        "XXXX-XXXX-XXXX-XXXX"
    );

    let record = OnboardingRecord::read(&path).unwrap();
    assert_eq!(record.serial, "IOTGW-0001234");
    assert_eq!(record.iterations, 100_000);
    assert_eq!(record.salt.len(), 32);
    assert!(code_verifies(&record, &serial, &code));
    // The code is stored nowhere in the state directory.
    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(!stored.contains(code.digits()), "{stored}");
}

#[test]
fn register_refuses_to_replace_without_replace_and_voids_the_old_label_with_it() {
    let dir = setup(
        "serial = { command = [\"echo\", \"GW-7\"] }",
        "iotd:x:4242:4343::/:/x\n",
    );
    let first = register(&dir, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", describe(&first));
    let (serial, old_code, _) = label(&first);
    assert_eq!(serial, "GW-7", "from the command");
    let path = dir.state_dir().join("onboarding.json");
    let before = std::fs::read(&path).unwrap();

    let again = register(&dir, &[]);
    assert_eq!(again.status.code(), Some(1), "{}", describe(&again));
    assert!(
        stderr(&again).contains("already has an onboarding registration")
            && stderr(&again).contains("--replace"),
        "{}",
        describe(&again)
    );
    assert!(stdout(&again).is_empty(), "no label: {}", describe(&again));
    assert_eq!(std::fs::read(&path).unwrap(), before, "left as it was");

    let replaced = register(&dir, &["--replace"]);
    assert_eq!(replaced.status.code(), Some(0), "{}", describe(&replaced));
    assert!(
        stderr(&replaced).contains("the code on this gateway's old label no longer works"),
        "{}",
        describe(&replaced)
    );
    let (_, new_code, _) = label(&replaced);
    assert_ne!(new_code, old_code);
    let record = OnboardingRecord::read(&path).unwrap();
    assert!(code_verifies(&record, "GW-7", &new_code));
    assert!(
        !code_verifies(&record, "GW-7", &old_code),
        "the old label is void"
    );
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 4242);
}

#[test]
fn without_a_user_iotd_the_record_stays_root_owned_and_it_says_so() {
    let dir = setup("serial = \"GW-1\"", "");
    std::fs::create_dir(dir.state_dir()).unwrap();
    let out = register(&dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let path = dir.state_dir().join("onboarding.json");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(
        stderr(&out).contains("owner root: there is no user iotd in /etc/passwd")
            && stderr(&out).contains(&format!("chown iotd:iotd {}", path.display())),
        "{}",
        describe(&out)
    );
    let (_, code, _) = label(&out);
    assert!(code_verifies(
        &OnboardingRecord::read(&path).unwrap(),
        "GW-1",
        &code
    ));
}

#[test]
fn register_without_a_serial_names_onboarding_serial() {
    let dir = setup("", "");
    let out = register(&dir, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).starts_with("iotctl: onboarding.serial is not set"),
        "{}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains(&dir.config_path().display().to_string()),
        "{}",
        describe(&out)
    );
    assert!(stdout(&out).is_empty());
    assert!(!dir.state_dir().join("onboarding.json").exists());
}

#[test]
fn register_refuses_a_serial_that_cannot_be_one() {
    for (onboarding, says) in [
        (
            "serial = { command = [\"echo\", \"GW 1\"] }",
            "onboarding.serial resolved to \"GW 1\", which cannot be a serial",
        ),
        (
            "serial = { file = \"/nonexistent/serial\" }",
            "resolving onboarding.serial: reading file /nonexistent/serial",
        ),
        // A literal is refused when the configuration is read.
        ("serial = \"A:B\"", "key onboarding.serial"),
    ] {
        let dir = setup(onboarding, "");
        let out = register(&dir, &[]);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(stderr(&out).contains(says), "{says}: {}", describe(&out));
        assert!(!dir.state_dir().join("onboarding.json").exists());
    }
}

/// As another user than root it refuses before reading anything (setpriv drops to nobody).
#[test]
fn register_must_run_as_root() {
    let dir = setup("serial = \"GW-1\"", "");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", iotctl()])
        .arg("--config")
        .arg(dir.config_path())
        .args(["onboarding", "register"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        stderr(&out),
        "iotctl: onboarding register must run as root: it writes the onboarding record into \
         iotd's state directory and gives it to user iotd\n"
    );
    assert!(!dir.state_dir().exists());
}

#[test]
fn register_is_in_help_and_man_pages() {
    let out = Command::new(iotctl())
        .args(["onboarding", "register", "--help"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(stdout(&out).contains("--replace"), "{}", describe(&out));
    let man = std::path::Path::new(env!("OUT_DIR")).join("man");
    let page = std::fs::read_to_string(man.join("iotctl-onboarding-register.1")).unwrap();
    assert!(page.contains("Verhoeff"), "{page}");
}
