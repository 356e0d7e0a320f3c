//! iotctl's command line as a black box: exit codes, `config check`, completions, man pages.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{Dir, NO_BUS, describe, iotctl, stderr, stdout};

/// Without a bus, every command that needs iotd exits 3 and says iotd is not running.
#[test]
fn no_bus_is_exit_code_3() {
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["status", "--watch"],
        &["rotate"],
        &["reprovision"],
    ] {
        let out = Command::new(iotctl())
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", NO_BUS)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", describe(&out));
        assert!(
            stderr(&out)
                .starts_with("iotctl: iotd is not running (no io.iotd.Agent1 on the system bus)"),
            "{args:?}: {}",
            describe(&out)
        );
        assert!(stdout(&out).is_empty(), "{args:?}: {}", describe(&out));
    }
}

#[test]
fn usage_errors_are_exit_code_2() {
    for args in [&["frobnicate"][..], &["status", "--yaml"], &[]] {
        let out = Command::new(iotctl()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
}

#[test]
fn help_documents_the_exit_codes() {
    let out = Command::new(iotctl()).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = stdout(&out);
    for code in [
        "0  success",
        "1  failure",
        "2  usage error",
        "3  iotd is not reachable",
    ] {
        assert!(help.contains(code), "{code}: {help}");
    }
}

#[test]
fn config_check_names_file_and_line() {
    let dir = Dir::new();
    let path = dir.config_path();
    std::fs::write(
        &path,
        "[cloud]\nendpoint = \"a-ats.iot.eu-west-1.amazonaws.com\"\n\n[provisioning]\ntemplate = \"gw\"\nformat = \"xml\"\n",
    )
    .unwrap();
    let out = Command::new(iotctl())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let expected = format!("{}:6:", path.display());
    assert!(
        stderr(&out).contains(&expected),
        "{expected}: {}",
        describe(&out)
    );
    assert!(
        stderr(&out).contains("provisioning.format"),
        "{}",
        describe(&out)
    );
}

#[test]
fn config_check_lists_the_merged_sources() {
    let dir = Dir::new();
    dir.write_config("a-ats.iot.eu-west-1.amazonaws.com", 8883, "", "");
    let dropins = dir.path().join("config.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::write(dropins.join("50-port.toml"), "[cloud]\nport = 443\n").unwrap();
    // The global --config and the FILE argument mean the same.
    for out in [
        Command::new(iotctl())
            .args(["config", "check"])
            .arg(dir.config_path())
            .output()
            .unwrap(),
        dir.run(&["config", "check"]),
    ] {
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let text = stdout(&out);
        let main = text.find(&dir.config_path().display().to_string());
        let dropin = text.find(&dropins.join("50-port.toml").display().to_string());
        assert!(
            main.is_some() && dropin.is_some() && main < dropin,
            "{text}"
        );
        assert!(text.ends_with("config ok\n"), "{text}");
    }
}

#[test]
fn config_check_of_a_missing_file_fails() {
    let out = Command::new(iotctl())
        .args(["config", "check", "/nonexistent/iotd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("/nonexistent/iotd.toml"),
        "{}",
        describe(&out)
    );
}

/// `config check` runs the parameter sources as iotd does before its first request: a failing
/// command is reported (naming the parameter), and values are never printed.
#[test]
fn config_check_runs_the_parameter_sources() {
    let dir = Dir::new();
    for (command, code, says) in [
        ("echo SN-0042-SECRETISH", 0, "1 template parameter resolved"),
        ("echo 'no /dev/mtd0' >&2; exit 1", 1, "Serial"),
    ] {
        let parameters = format!(
            "[provisioning.parameters]\nSerial = {{ command = [\"/bin/sh\", \"-c\", {command:?}] }}\n"
        );
        dir.write_config("a-ats.iot.eu-west-1.amazonaws.com", 8883, "", &parameters);
        let out = dir.run(&["config", "check"]);
        assert_eq!(out.status.code(), Some(code), "{}", describe(&out));
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(all.contains(says), "{all}");
        assert!(!all.contains("SN-0042"), "values are not shown: {all}");
        if code == 1 {
            assert!(all.contains("no /dev/mtd0"), "{all}");
        }
    }
}

#[test]
fn completions_for_bash() {
    let out = Command::new(iotctl())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let script = stdout(&out);
    assert!(script.contains("_iotctl()"), "{script}");
    assert!(script.contains("support-bundle"), "{script}");
}

/// build.rs renders one page per command into $OUT_DIR/man, with the exit codes in them.
#[test]
fn man_pages_are_generated() {
    let man = std::path::Path::new(env!("OUT_DIR")).join("man");
    for page in [
        "iotctl.1",
        "iotctl-status.1",
        "iotctl-check.1",
        "iotctl-rotate.1",
        "iotctl-reprovision.1",
        "iotctl-config-check.1",
        "iotctl-support-bundle.1",
        "iotctl-completions.1",
    ] {
        let text = std::fs::read_to_string(man.join(page))
            .unwrap_or_else(|e| panic!("reading {page}: {e}"));
        assert!(text.starts_with(".ie"), "{page} is not roff: {text}");
    }
    let main = std::fs::read_to_string(man.join("iotctl.1")).unwrap();
    assert!(main.contains("iotd is not reachable"), "{main}");
}
