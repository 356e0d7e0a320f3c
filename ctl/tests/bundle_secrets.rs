//! `iotctl support-bundle` with a secret planted in every source it reads: the config file and
//! a drop-in (literal parameters, parameter commands on one line and one argument per line, a
//! private key pasted into a comment), the claim key, a device key, state.json (ownership
//! token, last error), iotd's status over D-Bus (last error, what it waits for), the journal,
//! and the environment. Every secret holds `S3CRET`, so that a partial leak is caught too; the
//! context support needs (command names, flag names, other values) must stay.
//!
//! Needs dbus-daemon and root (the test owns iotd's bus name, as `live.rs` does).
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use common::{Dir, closed_port, describe};
use iotd::core::Handle;
use iotd::snapshot::Snapshot;
use iotd::store::{ClaimOrigin, Durability, LastError, Operation, State, Step, Store};
use iotd_testkit::dbus_daemon::DbusDaemon;
use iotd_testkit::{ROOT_MAY_OWN, dbus_policy_file};
use tokio::sync::{broadcast, mpsc, watch};

const WAIT: Duration = Duration::from_secs(60);

/// What every planted secret contains.
const MARK: &str = "S3CRET";

const CLAIM_KEY_BODY: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHS3CRETclaimkeybody";
const DEVICE_KEY_BODY: &str = "MHcCAQEEIS3CRETdevicekeybodyoAoGCCqGSM49AwEHoUQDQgAE";

/// The main config: a literal secret parameter and two parameter commands with secret
/// arguments. `{claim_cert}`/`{claim_key}` are filled in.
const MAIN_PARAMETERS: &str = r#"
[provisioning.parameters]
SerialNumber = "SN-0001"
ApiToken = "S3CRET-literal-parameter"
Serial = { command = ["/usr/bin/get-serial", "--password=S3CRET-flag-equals", "--device", "/dev/ttyS0"] }
Model = { command = ["/usr/bin/get-model", "--token", "S3CRET-flag-next", "--verbose"] }
"#;

/// A drop-in: a private key pasted into a comment, a command written one argument per line, and
/// the other kinds of secret arguments.
const DROPIN: &str = r#"# The installer pasted this by mistake:
# -----BEGIN PRIVATE KEY-----
# MIGHAgEAMBMGS3CRETpastedkey
# -----END PRIVATE KEY-----
[provisioning.parameters]
Site = "berlin"
Owner = { command = ["/usr/bin/get-owner", "--api-key=S3CRET-api-key", "--auth", "S3CRET-auth", "--credential-file=S3CRET-credential", "--passwd", "S3CRET-spaced one S3CRET-spaced-two"] }

[provisioning.parameters.Region]
command = [
  "env",
  "DB_PASSWORD=S3CRET-environment-style",
  "/usr/bin/get-region",
  "--url=https://fleet-user:S3CRET-url-password@config.example.com/region",
  "--client-secret",
  "S3CRET-next-line",
]
"#;

/// What iotd's journal says: commands and their stderr, a URL with a password, a key, and lines
/// of the claim and device keys without their armour.
fn journal() -> String {
    format!(
        "2026-06-07T10:00:00+0000 gw iotd[311]: resolving template parameter Serial: command `/usr/bin/get-serial '--password=S3CRET-journal-a S3CRET-journal-b'` failed (exit status: 1): login with S3CRET-flag-equals refused
2026-06-07T10:00:01+0000 gw iotd[311]: fetching https://admin:S3CRET-journal-url@updates.example.com/x
2026-06-07T10:00:02+0000 gw iotd[311]: running env AWS_SECRET_ACCESS_KEY=S3CRET-journal-env /usr/bin/get-region
2026-06-07T10:00:03+0000 gw iotd[311]: the hook sent Authorization: Bearer S3CRET-journal-bearer
2026-06-07T10:00:04+0000 gw iotd[311]: the hook printed:
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIS3CRETjournalpem
-----END EC PRIVATE KEY-----
2026-06-07T10:00:05+0000 gw iotd[311]: claim key line {CLAIM_KEY_BODY}
2026-06-07T10:00:06+0000 gw iotd[311]: device key line {DEVICE_KEY_BODY}
2026-06-07T10:00:07+0000 gw iotd[311]: connected to example-ats.iot.eu-west-1.amazonaws.com:8883
"
    )
}

/// What iotd publishes on D-Bus: a last error that quotes a command and its stderr, and a
/// wait that quotes a request.
fn snapshot() -> Snapshot {
    Snapshot {
        state: iotd_api::state::PROVISIONING,
        step: "key-ready",
        waiting_for: Some(
            "a claim: the onboarding server sent Authorization: Bearer S3CRET-dbus-bearer".into(),
        ),
        key_backend: "file",
        endpoint: "example-ats.iot.eu-west-1.amazonaws.com:8883".into(),
        last_error: Some(LastError {
            sticky: false,
            code: "config".into(),
            message: "resolving template parameter Serial: command `/usr/bin/get-serial \
                      '--password=S3CRET-dbus-a S3CRET-dbus-b' --device /dev/ttyS0` failed \
                      (exit status: 1): curl: (22) https://svc:S3CRET-dbus-url@api.example.com/serial: 401"
                .into(),
            at: 1_780_826_310,
            permanent: false,
            retry_at: Some(1_780_826_315),
        }),
        ..Snapshot::default()
    }
}

/// A state that holds an ownership token and a last error that quotes a command.
fn state() -> State {
    State {
        operation: Some(Operation::Provisioning {
            claim: ClaimOrigin::File,
            step: Some(Step::CertificateIssued {
                endpoint: None,
                generation: 1,
                certificate_id: "c0ffee".into(),
                certificate_pem: String::new(),
                ownership_token: "S3CRET-ownership-token".into(),
                issued_at: 1_700_000_000,
            }),
        }),
        last_generation: 1,
        last_error: Some(LastError {
            sticky: false,
            code: "config".into(),
            message: "resolving template parameter Model: command `/usr/bin/get-model --token \
                      S3CRET-state-token --verbose` failed (exit status: 2): env \
                      API_KEY=S3CRET-state-env rejected"
                .into(),
            at: 1_780_826_000,
            permanent: true,
            retry_at: None,
        }),
        ..State::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_planted_secret_reaches_the_bundle() {
    let dir = Dir::new();
    dir.clock(true);

    let claim_key = dir.path().join("claim-S3CRET-name.key");
    std::fs::write(
        &claim_key,
        format!("-----BEGIN PRIVATE KEY-----\n{CLAIM_KEY_BODY}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let claim_cert = dir.path().join("claim.pem");
    std::fs::write(&claim_cert, "not a certificate\n").unwrap();
    dir.write_config(
        "127.0.0.1",
        closed_port(),
        &format!(
            "claim_certificate = \"{}\"\nclaim_key = \"{}\"\n{MAIN_PARAMETERS}",
            claim_cert.display(),
            claim_key.display()
        ),
        "",
    );
    let dropins = dir.path().join("config.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::write(dropins.join("50-site.toml"), DROPIN).unwrap();

    let store = Store::open(&dir.state_dir()).unwrap();
    store.save(&state(), Durability::Durable).unwrap();
    let gen_dir = dir.state_dir().join("gen/1");
    std::fs::create_dir_all(&gen_dir).unwrap();
    std::fs::write(
        gen_dir.join("key.pem"),
        format!(
            "-----BEGIN EC PRIVATE KEY-----\n{DEVICE_KEY_BODY}\n-----END EC PRIVATE KEY-----\n"
        ),
    )
    .unwrap();

    let journalctl = dir.bin().join("journalctl");
    std::fs::write(
        &journalctl,
        format!("#!/bin/sh\ncat <<'EOF'\n{}EOF\n", journal()),
    )
    .unwrap();
    std::fs::set_permissions(&journalctl, std::fs::Permissions::from_mode(0o755)).unwrap();

    // iotd on a private bus, publishing the snapshot.
    let bus = DbusDaemon::start(&[&dbus_policy_file()], Some(ROOT_MAY_OWN));
    let (commands, _commands_rx) = mpsc::channel(4);
    let (_snapshot_tx, snapshot_rx) = watch::channel(snapshot());
    let (events, _) = broadcast::channel(16);
    let handle = Handle {
        commands,
        snapshot: snapshot_rx,
        events: events.clone(),
        onboarding: iotd::onboard::port::Port::pair().0,
    };
    let _server = match iotd::dbus::serve(handle, Some(bus.address())).await {
        Ok(server) => server,
        Err(e) => panic!("serving: {e}\ndbus-daemon log:\n{}", bus.log()),
    };

    // Why iotd last stopped, quoting a parameter command's failure.
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::write(
        runtime.join("exit.json"),
        serde_json::json!({
            "status": 1, "code": "parameter", "at": 1, "pid": 7,
            "message": "resolving template parameter Serial: command `/usr/bin/get-serial --password=S3CRET-exit-record` failed",
        })
        .to_string(),
    )
    .unwrap();

    let mut command = dir.command(&["support-bundle", "--output", "-"]);
    command
        .env("RUNTIME_DIRECTORY", &runtime)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address())
        .env("AWS_SECRET_ACCESS_KEY", "S3CRET-environment");
    let out = tokio::time::timeout(WAIT, tokio::process::Command::from(command).output())
        .await
        .expect("support-bundle finishes in time")
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let bundle = common::stdout(&out);

    let leaks: Vec<&str> = bundle.lines().filter(|l| l.contains(MARK)).collect();
    assert!(
        leaks.is_empty(),
        "secrets in the bundle:\n{}\n\nthe bundle:\n{bundle}",
        leaks.join("\n")
    );
    for fact in [
        // The sources were read at all.
        "\"state\": \"provisioning\"",
        "50-site.toml",
        "===== journal",
        "===== last exit",
        "/usr/bin/get-serial --password=<redacted>",
        // Config: command names, flag names and other values stay.
        "SerialNumber = \"SN-0001\"",
        "ApiToken = \"<redacted>\"",
        "Serial = { command = [\"/usr/bin/get-serial\", \"--password=<redacted>\", \"--device\", \"/dev/ttyS0\"] }",
        "Model = { command = [\"/usr/bin/get-model\", \"--token\", \"<redacted>\", \"--verbose\"] }",
        "# [private key removed]",
        "Site = \"berlin\"",
        "\"--api-key=<redacted>\", \"--auth\", \"<redacted>\", \"--credential-file=<redacted>\", \"--passwd\", \"<redacted>\"] }",
        "  \"DB_PASSWORD=<redacted>\",\n  \"/usr/bin/get-region\",",
        "\"--url=https://fleet-user:<redacted>@config.example.com/region\",",
        "  \"--client-secret\",\n  \"<redacted>\",",
        "claim_key = \"<redacted>\"",
        // D-Bus status.
        "command `/usr/bin/get-serial '--password=<redacted>' --device /dev/ttyS0` failed (exit status: 1): curl: (22) https://svc:<redacted>@api.example.com/serial: 401",
        "\"code\": \"config\"",
        "the onboarding server sent Authorization: Bearer <redacted>",
        // state.json.
        "\"ownershipToken\": \"<redacted>\"",
        "command `/usr/bin/get-model --token <redacted> --verbose` failed (exit status: 2): env API_KEY=<redacted> rejected",
        // The journal.
        "command `/usr/bin/get-serial '--password=<redacted>'` failed (exit status: 1): login with <redacted> refused",
        "fetching https://admin:<redacted>@updates.example.com/x",
        "running env AWS_SECRET_ACCESS_KEY=<redacted> /usr/bin/get-region",
        "the hook sent Authorization: Bearer <redacted>",
        "the hook printed:\n[private key removed]\n",
        "claim key line <redacted>",
        "device key line <redacted>",
        "connected to example-ats.iot.eu-west-1.amazonaws.com:8883",
    ] {
        assert!(bundle.contains(fact), "{fact} is missing:\n{bundle}");
    }
}
