#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::parameters::{display_command, resolve_all};
use super::*;

const ENDPOINT: &str = "example-ats.iot.eu-west-1.amazonaws.com";
const REQUIRED: &str = "[cloud]\nendpoint = \"example-ats.iot.eu-west-1.amazonaws.com\"\n\
                        [provisioning]\ntemplate = \"gw-template\"\n";

fn fragments(parts: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    parts
        .iter()
        .map(|(path, text)| (PathBuf::from(path), (*text).to_owned()))
        .collect()
}

fn load_parts(parts: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    load_fragments(&fragments(parts))
}

/// `text` as a drop-in after the required keys; returns the error message.
fn error_of(text: &str) -> String {
    match load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        ("/d/20-site.toml", text),
    ]) {
        Ok(settings) => panic!("expected an error for {text:?}, got {settings:?}"),
        Err(error) => error.to_string(),
    }
}

/// `text` as a drop-in after the required keys; returns the settings.
fn with(text: &str) -> Settings {
    load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        ("/d/20-site.toml", text),
    ])
    .unwrap()
}

// ---- defaults and merging -------------------------------------------------------------------

#[test]
fn defaults_apply_when_only_required_keys_are_set() {
    let s = load_parts(&[("/etc/iotd/config.toml", REQUIRED)]).unwrap();
    assert_eq!(s.cloud.endpoint, ENDPOINT);
    assert_eq!(s.cloud.port, 8883);
    assert!(!s.cloud.alpn);
    assert_eq!(s.cloud.ca_bundle, None);
    assert_eq!(s.cloud.keep_alive, Duration::from_secs(300));
    assert_eq!(s.cloud.reply_timeout, Duration::from_secs(30));
    assert_eq!(s.cloud.throttle_retry_max, Duration::from_secs(10));
    assert_eq!(s.provisioning.template, "gw-template");
    assert_eq!(s.provisioning.certificate_source, CertificateSource::Csr);
    assert!(s.provisioning.claim.is_none());
    assert_eq!(s.provisioning.claim_client_id, None);
    assert!(!s.provisioning.delete_claim);
    assert_eq!(s.provisioning.format, PayloadFormat::Json);
    assert!(s.provisioning.parameters.is_empty());
    assert_eq!(s.key, KeySettings::File);
    assert_eq!(s.state_dir, Path::new("/var/lib/iotd"));
    assert_eq!(s.sources, vec![PathBuf::from("/etc/iotd/config.toml")]);
}

#[test]
fn every_key_is_read() {
    let s = with(
        r#"
        [cloud]
        port = 9443
        alpn = true
        ca_bundle = "/etc/iotd/ca.pem"
        keep_alive_secs = 60
        reply_timeout_secs = 10
        throttle_retry_max_secs = 60
        [provisioning]
        certificate_source = "cloud-generated"
        claim_certificate = "/c/claim.pem"
        claim_key = "/c/claim.key"
        claim_client_id = "iotd-0011223344556677"
        delete_claim = true
        format = "cbor"
        [key]
        backend = "file"
        [state]
        dir = "/data/iotd"
        "#,
    );
    assert_eq!(s.cloud.port, 9443);
    assert!(s.cloud.alpn);
    assert_eq!(s.cloud.ca_bundle, Some(PathBuf::from("/etc/iotd/ca.pem")));
    assert_eq!(s.cloud.keep_alive, Duration::from_secs(60));
    assert_eq!(s.cloud.reply_timeout, Duration::from_secs(10));
    assert_eq!(s.cloud.throttle_retry_max, Duration::from_secs(60));
    assert_eq!(
        s.provisioning.certificate_source,
        CertificateSource::CloudGenerated
    );
    let claim = s.provisioning.claim.unwrap();
    assert_eq!(claim.certificate, Path::new("/c/claim.pem"));
    assert_eq!(claim.key, Path::new("/c/claim.key"));
    assert_eq!(
        s.provisioning.claim_client_id.as_deref(),
        Some("iotd-0011223344556677")
    );
    assert!(s.provisioning.delete_claim);
    assert_eq!(s.provisioning.format, PayloadFormat::Cbor);
    assert_eq!(s.key, KeySettings::File);
    assert_eq!(s.state_dir, Path::new("/data/iotd"));
}

#[test]
fn alpn_defaults_to_true_on_port_443_only() {
    assert!(with("[cloud]\nport = 443\n").cloud.alpn);
    assert!(!with("[cloud]\nport = 8883\n").cloud.alpn);
    assert!(!with("[cloud]\nport = 443\nalpn = false\n").cloud.alpn);
    assert!(with("[cloud]\nport = 18443\nalpn = true\n").cloud.alpn);
}

#[test]
fn any_port_is_accepted() {
    assert_eq!(with("[cloud]\nport = 1\n").cloud.port, 1);
    assert_eq!(with("[cloud]\nport = 65535\n").cloud.port, 65535);
}

#[test]
fn later_fragments_override_scalar_keys() {
    let s = load_parts(&[
        ("/a.toml", REQUIRED),
        (
            "/b.toml",
            "[cloud]\nport = 443\nkeep_alive_secs = 100\n[state]\ndir = \"/b\"\n",
        ),
        ("/c.toml", "[cloud]\nport = 8884\n"),
    ])
    .unwrap();
    assert_eq!(s.cloud.port, 8884);
    // ALPN follows the port that won, not one that was overridden.
    assert!(!s.cloud.alpn);
    assert_eq!(s.cloud.keep_alive, Duration::from_secs(100));
    assert_eq!(s.state_dir, Path::new("/b"));
    assert_eq!(s.cloud.endpoint, ENDPOINT);
}

#[test]
fn parameters_merge_per_name() {
    let s = load_parts(&[
        ("/a.toml", REQUIRED),
        (
            "/b.toml",
            "[provisioning.parameters]\nSite = \"berlin\"\nSerialNumber = { file = \"/sys/serial\" }\n",
        ),
        (
            "/c.toml",
            "[provisioning.parameters]\nSite = \"hamburg\"\nModel = { command = [\"model\", \"-s\"] }\n",
        ),
    ])
    .unwrap();
    let expected = BTreeMap::from([
        (
            "Model".to_owned(),
            ParameterSource::Command(vec!["model".to_owned(), "-s".to_owned()]),
        ),
        (
            "SerialNumber".to_owned(),
            ParameterSource::File(PathBuf::from("/sys/serial")),
        ),
        (
            "Site".to_owned(),
            ParameterSource::Literal("hamburg".to_owned()),
        ),
    ]);
    assert_eq!(s.provisioning.parameters, expected);
}

#[test]
fn parameters_may_be_written_as_dotted_keys_and_quoted_names() {
    let s = with("provisioning.parameters.\"Serial Number\" = \"x\"\n");
    assert_eq!(
        s.provisioning.parameters.get("Serial Number"),
        Some(&ParameterSource::Literal("x".to_owned()))
    );
}

#[test]
fn tpm_backend_defaults_and_handles() {
    let s = with("[key]\nbackend = \"tpm\"\n");
    assert_eq!(
        s.key,
        KeySettings::Tpm {
            tcti: "device:/dev/tpmrm0".to_owned(),
            persistent_handle: None
        }
    );
    let s = with(
        "[key]\nbackend = \"tpm\"\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\npersistent_handle = \"0x81010001\"\n",
    );
    assert_eq!(
        s.key,
        KeySettings::Tpm {
            tcti: "swtpm:host=127.0.0.1,port=2321".to_owned(),
            persistent_handle: Some(0x8101_0001)
        }
    );
    // A TOML hex integer is read as well as the string form.
    let s = with("[key]\nbackend = \"tpm\"\npersistent_handle = 0x81000002\n");
    assert!(matches!(
        s.key,
        KeySettings::Tpm {
            persistent_handle: Some(0x8100_0002),
            ..
        }
    ));
}

#[test]
fn tpm_keys_are_ignored_with_the_file_backend() {
    let s = with("[key]\ntcti = \"mssim:host=localhost\"\npersistent_handle = \"0x81010001\"\n");
    assert_eq!(s.key, KeySettings::File);
}

#[test]
fn sources_list_the_fragments_that_were_read() {
    let s = load_parts(&[("/a.toml", REQUIRED), ("/b.toml", ""), ("/c.toml", "# c\n")]).unwrap();
    assert_eq!(
        s.sources,
        vec![PathBuf::from("/a.toml"), PathBuf::from("/c.toml")]
    );
}

// ---- required keys and rules across keys -----------------------------------------------------

#[test]
fn missing_required_keys_are_named() {
    let error = load_parts(&[(
        "/etc/iotd/config.toml",
        "[provisioning]\ntemplate = \"t\"\n",
    )])
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "missing required key cloud.endpoint (set it in /etc/iotd/config.toml or a config.d drop-in)"
    );
    let error = load_parts(&[("/x/main.toml", "[cloud]\nendpoint = \"h.test\"\n")]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "missing required key provisioning.template (set it in /x/main.toml or a config.d drop-in)"
    );
    let error = load_parts(&[]).unwrap_err();
    assert!(
        error.to_string().contains("/etc/iotd/config.toml"),
        "{error}"
    );
}

#[test]
fn cloud_generated_certificates_need_the_file_backend() {
    let error = load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        (
            "/etc/iotd/config.d/20-site.toml",
            "[provisioning]\ncertificate_source = \"cloud-generated\"\n",
        ),
        (
            "/run/iotd/config.d/30-tpm.toml",
            "[key]\nbackend = \"tpm\"\n",
        ),
    ])
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "/etc/iotd/config.d/20-site.toml:2:22: key provisioning.certificate_source: \
         \"cloud-generated\" needs key.backend = \"file\" \
         (key.backend = \"tpm\" at /run/iotd/config.d/30-tpm.toml:2:11): \
         a TPM key never leaves the TPM"
    );
    // The same keys are fine with the file backend, and csr is fine with the TPM.
    let s = with(
        "[provisioning]\ncertificate_source = \"cloud-generated\"\n[key]\nbackend = \"file\"\n",
    );
    assert_eq!(
        s.provisioning.certificate_source,
        CertificateSource::CloudGenerated
    );
    let s = with("[provisioning]\ncertificate_source = \"csr\"\n[key]\nbackend = \"tpm\"\n");
    assert!(matches!(s.key, KeySettings::Tpm { .. }));
}

#[test]
fn deleting_the_claim_cannot_be_combined_with_provisioning_again_from_it() {
    let error = load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        (
            "/etc/iotd/config.d/20-site.toml",
            "[provisioning]\ndelete_claim = true\n",
        ),
        (
            "/run/iotd/config.d/30-tpm.toml",
            "[provisioning]\nreprovision_when_key_lost = true\n",
        ),
    ])
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "/etc/iotd/config.d/20-site.toml:2:16: key provisioning.delete_claim: true cannot be \
         combined with provisioning.reprovision_when_key_lost = true \
         (at /run/iotd/config.d/30-tpm.toml:2:29): deleting the claim after provisioning leaves \
         nothing to provision a new identity with when the device key is lost; set one of them \
         to false"
    );
    assert!(!error.is_transient());
    // Either one alone is fine; with delete_claim, reprovision_when_key_lost defaults to false.
    let s = with("[provisioning]\ndelete_claim = true\n");
    assert!(s.provisioning.delete_claim && !s.provisioning.reprovision_when_key_lost);
    assert!(with("").provisioning.reprovision_when_key_lost);
    let s = with("[provisioning]\ndelete_claim = true\nreprovision_when_key_lost = false\n");
    assert!(s.provisioning.delete_claim && !s.provisioning.reprovision_when_key_lost);
    let s = with("[provisioning]\ndelete_claim = false\nreprovision_when_key_lost = true\n");
    assert!(!s.provisioning.delete_claim && s.provisioning.reprovision_when_key_lost);
    // An override that turns one off settles it.
    let s = load_parts(&[
        ("/a.toml", REQUIRED),
        (
            "/b.toml",
            "[provisioning]\ndelete_claim = true\nreprovision_when_key_lost = true\n",
        ),
        ("/c.toml", "[provisioning]\ndelete_claim = false\n"),
    ])
    .unwrap();
    assert!(!s.provisioning.delete_claim);
}

#[test]
fn claim_paths_come_in_pairs() {
    assert_eq!(
        error_of("[provisioning]\nclaim_certificate = \"/c/claim.pem\"\n"),
        "/d/20-site.toml:2:21: key provisioning.claim_certificate: \
         is set but provisioning.claim_key is not (set both, or neither)"
    );
    assert_eq!(
        error_of("[provisioning]\nclaim_key = \"/c/claim.key\"\n"),
        "/d/20-site.toml:2:13: key provisioning.claim_key: \
         is set but provisioning.claim_certificate is not (set both, or neither)"
    );
}

// ---- unknown keys -----------------------------------------------------------------------------

#[test]
fn unknown_top_level_key_is_refused() {
    assert_eq!(
        error_of("clod = 1\n"),
        "/d/20-site.toml:1:1: key clod: unknown key \
         (expected one of: cloud, provisioning, key, state, onboarding, rotation); \
         did you mean cloud?"
    );
    assert_eq!(
        error_of("\n[metrics]\nx = 1\n"),
        "/d/20-site.toml:2:2: key metrics: unknown key \
         (expected one of: cloud, provisioning, key, state, onboarding, rotation)"
    );
}

#[test]
fn unknown_nested_key_is_refused() {
    assert_eq!(
        error_of("[provisioning]\ntemplate = \"t\"\n\ntempalte = \"x\"\n"),
        "/d/20-site.toml:4:1: key provisioning.tempalte: unknown key (expected one of: \
         template, certificate_source, claim_certificate, claim_key, claim_client_id, \
         delete_claim, reprovision_when_key_lost, format, parameters); did you mean template?"
    );
    assert_eq!(
        error_of("cloud.keepalive = 30\n"),
        "/d/20-site.toml:1:7: key cloud.keepalive: unknown key (expected one of: \
         endpoint, port, alpn, ca_bundle, keep_alive_secs, reply_timeout_secs, \
         throttle_retry_max_secs, report_topic)"
    );
    assert_eq!(
        error_of("[provisioning.parameters]\nSerial = { fil = \"/x\" }\n"),
        "/d/20-site.toml:2:12: key provisioning.parameters.Serial.fil: unknown key \
         (expected one of: file, command); did you mean file?"
    );
}

// ---- wrong types --------------------------------------------------------------------------

#[test]
fn wrong_types_are_refused_with_the_key() {
    assert_eq!(
        error_of("[cloud]\nport = \"8883\"\n"),
        "/d/20-site.toml:2:8: key cloud.port: invalid type: string \"8883\", expected an integer"
    );
    assert_eq!(
        error_of("[cloud]\nalpn = \"yes\"\n"),
        "/d/20-site.toml:2:8: key cloud.alpn: invalid type: string \"yes\", expected a boolean"
    );
    assert_eq!(
        error_of("[provisioning]\ntemplate = 5\n"),
        "/d/20-site.toml:2:12: key provisioning.template: invalid type: integer `5`, expected a string"
    );
    assert_eq!(
        error_of("cloud = 5\n"),
        "/d/20-site.toml:1:9: key cloud: invalid type: integer `5`, expected a [cloud] table"
    );
    assert_eq!(
        error_of("[[state]]\ndir = \"/x\"\n"),
        "/d/20-site.toml:1:3: key state: invalid type: array, expected a [state] table"
    );
    // Serde would fill a struct from an array by position; the key names must be used.
    assert_eq!(
        error_of("cloud = [\"h.test\"]\n"),
        "/d/20-site.toml:1:1: key cloud: invalid type: array, expected a [cloud] table"
    );
    assert_eq!(
        error_of("[provisioning]\nparameters = [\"x\"]\n"),
        "/d/20-site.toml:2:1: key provisioning.parameters: invalid type: array, \
         expected a [provisioning.parameters] table"
    );
    assert_eq!(
        error_of("[provisioning.parameters]\nSite = 5\n"),
        "/d/20-site.toml:2:8: key provisioning.parameters.Site: invalid type: integer `5`, \
         expected a string, { file = \"path\" } or { command = [\"program\", \"argument\"] }"
    );
    assert_eq!(
        error_of("[provisioning.parameters]\nModel = { command = \"cat /x\" }\n"),
        "/d/20-site.toml:2:21: key provisioning.parameters.Model.command: \
         invalid type: string \"cat /x\", expected a sequence"
    );
    assert_eq!(
        error_of("[provisioning.parameters]\nModel = { command = [\"cat\", 1] }\n"),
        "/d/20-site.toml:2:29: key provisioning.parameters.Model.command[1]: \
         invalid type: integer `1`, expected a string"
    );
    assert_eq!(
        error_of("[key]\npersistent_handle = true\n"),
        "/d/20-site.toml:2:21: key key.persistent_handle: \
         expected a handle like \"0x81010001\", found a boolean"
    );
}

#[test]
fn syntax_errors_name_the_place_and_the_key() {
    assert_eq!(
        error_of("[cloud]\nport = \n"),
        "/d/20-site.toml:2:8: key cloud.port: invalid TOML: \
         string values must be quoted, expected literal string"
    );
    assert_eq!(
        error_of("[cloud]\nport = 1\nport = 2\n"),
        "/d/20-site.toml:3:1: key cloud.port: invalid TOML: duplicate key"
    );
    assert_eq!(
        error_of("[cloud]\nport = 1\n[provisioning]\ntemplate = \"a\"\ntemplate = \"b\"\n"),
        "/d/20-site.toml:5:1: key provisioning.template: invalid TOML: duplicate key"
    );
    assert_eq!(
        error_of("cloud.port = 1\ncloud.port = 2\n"),
        "/d/20-site.toml:2:7: key cloud.port: invalid TOML: duplicate key"
    );
    assert_eq!(
        error_of("[cloud]\n[cloud]\n"),
        "/d/20-site.toml:2:2: key cloud: invalid TOML: duplicate key"
    );
    // Where no key can be named, the place still is.
    assert_eq!(
        error_of("[cloud]\ngarbage line\n"),
        "/d/20-site.toml:2:9: invalid TOML: key with no value, expected `=`"
    );
}

// ---- values out of range ---------------------------------------------------------------------

#[test]
fn invalid_values_are_refused_with_file_line_column_and_key() {
    let cases = [
        (
            "[cloud]\nport = 70000\n",
            "/d/20-site.toml:2:8: key cloud.port: 70000 is not a TCP port (1 to 65535)",
        ),
        (
            "[cloud]\nport = 0\n",
            "/d/20-site.toml:2:8: key cloud.port: 0 is not a TCP port (1 to 65535)",
        ),
        (
            "[cloud]\nkeep_alive_secs = 29\n",
            "/d/20-site.toml:2:19: key cloud.keep_alive_secs: 29 is out of range (30 to 1200 seconds)",
        ),
        (
            "[cloud]\nkeep_alive_secs = 1201\n",
            "/d/20-site.toml:2:19: key cloud.keep_alive_secs: 1201 is out of range (30 to 1200 seconds)",
        ),
        (
            "[cloud]\nreply_timeout_secs = 301\n",
            "/d/20-site.toml:2:22: key cloud.reply_timeout_secs: 301 is out of range (5 to 300 seconds)",
        ),
        (
            "[cloud]\nthrottle_retry_max_secs = 0\n",
            "/d/20-site.toml:2:27: key cloud.throttle_retry_max_secs: 0 is out of range (1 to 300 seconds)",
        ),
        (
            "[cloud]\nreply_timeout_secs = -1\n",
            "/d/20-site.toml:2:22: key cloud.reply_timeout_secs: -1 is out of range (5 to 300 seconds)",
        ),
        (
            "[cloud]\nendpoint = \"https://x.iot.eu-west-1.amazonaws.com\"\n",
            "/d/20-site.toml:2:12: key cloud.endpoint: \"https://x.iot.eu-west-1.amazonaws.com\" \
             is a URL; give only the host name, without \"https://\"",
        ),
        (
            "[cloud]\nendpoint = \"x.example.com:8883\"\n",
            "/d/20-site.toml:2:12: key cloud.endpoint: \"x.example.com:8883\" is not a host name; \
             give the port in cloud.port",
        ),
        (
            "[cloud]\nendpoint = \"bad name\"\n",
            "/d/20-site.toml:2:12: key cloud.endpoint: \"bad name\" is not a host name or IP address",
        ),
        (
            "[cloud]\nendpoint = \"\"\n",
            "/d/20-site.toml:2:12: key cloud.endpoint: \"\" is not a host name or IP address",
        ),
        (
            "[cloud]\nca_bundle = \"certs/ca.pem\"\n",
            "/d/20-site.toml:2:13: key cloud.ca_bundle: \"certs/ca.pem\" is not an absolute path",
        ),
        (
            "[provisioning]\ntemplate = \"gw template\"\n",
            "/d/20-site.toml:2:12: key provisioning.template: \"gw template\" is not a provisioning \
             template name (1 to 36 of A-Z a-z 0-9 _ -)",
        ),
        (
            "[provisioning]\ntemplate = \"0123456789012345678901234567890123456\"\n",
            "/d/20-site.toml:2:12: key provisioning.template: \"0123456789012345678901234567890123456\" \
             is not a provisioning template name (1 to 36 of A-Z a-z 0-9 _ -)",
        ),
        (
            "[provisioning]\ncertificate_source = \"CSR\"\n",
            "/d/20-site.toml:2:22: key provisioning.certificate_source: \"CSR\" is not one of: \
             \"csr\", \"cloud-generated\"",
        ),
        (
            "[provisioning]\nformat = \"xml\"\n",
            "/d/20-site.toml:2:10: key provisioning.format: \"xml\" is not one of: \"json\", \"cbor\"",
        ),
        (
            "[provisioning]\nclaim_client_id = \"iotd gw\"\n",
            "/d/20-site.toml:2:19: key provisioning.claim_client_id: \"iotd gw\" contains \
             whitespace or control characters",
        ),
        (
            "[provisioning]\nclaim_key = \"claim.key\"\n",
            "/d/20-site.toml:2:13: key provisioning.claim_key: \"claim.key\" is not an absolute path",
        ),
        (
            "[provisioning.parameters]\nSerial = { file = \"serial\" }\n",
            "/d/20-site.toml:2:19: key provisioning.parameters.Serial.file: \"serial\" is not an \
             absolute path",
        ),
        (
            "[provisioning.parameters]\nSerial = { command = [] }\n",
            "/d/20-site.toml:2:22: key provisioning.parameters.Serial.command: an empty command \
             names no program",
        ),
        (
            "[provisioning.parameters]\nSerial = { file = \"/a\", command = [\"b\"] }\n",
            "/d/20-site.toml:2:10: key provisioning.parameters.Serial: set either file or command, \
             not both",
        ),
        (
            "[provisioning.parameters]\nSerial = {}\n",
            "/d/20-site.toml:2:10: key provisioning.parameters.Serial: expected { file = \"path\" } \
             or { command = [\"program\", \"argument\"] }",
        ),
        (
            "[provisioning.parameters]\n\"\" = \"x\"\n",
            "/d/20-site.toml:2:1: key provisioning.parameters.\"\": a parameter name cannot be empty",
        ),
        (
            "[key]\nbackend = \"pkcs11\"\n",
            "/d/20-site.toml:2:11: key key.backend: \"pkcs11\" is not one of: \"file\", \"tpm\"",
        ),
        (
            "[key]\ntcti = \"/dev/tpm0\"\n",
            "/d/20-site.toml:2:8: key key.tcti: \"/dev/tpm0\" is not a TCTI (expected device:PATH, \
             swtpm:…, mssim:… or tabrmd:…)",
        ),
        (
            "[key]\npersistent_handle = \"0x80000001\"\n",
            "/d/20-site.toml:2:21: key key.persistent_handle: 0x80000001 is not a TPM persistent \
             handle (0x81000000 to 0x81ffffff)",
        ),
        (
            "[key]\npersistent_handle = \"handle\"\n",
            "/d/20-site.toml:2:21: key key.persistent_handle: \"handle\" is not a TPM handle",
        ),
        (
            "[state]\ndir = \"var/lib/iotd\"\n",
            "/d/20-site.toml:2:7: key state.dir: \"var/lib/iotd\" is not an absolute path",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error_of(text), expected, "for {text:?}");
    }
}

#[test]
fn valid_host_names_and_addresses_are_accepted() {
    for host in [
        "iot.test",
        "localhost",
        "127.0.0.1",
        "::1",
        "a-b_c.example.com.",
    ] {
        let s = with(&format!("[cloud]\nendpoint = \"{host}\"\n"));
        assert_eq!(s.cloud.endpoint, host);
    }
}

#[test]
fn a_bad_value_is_refused_even_when_a_later_file_overrides_it() {
    let error = load_parts(&[
        ("/a.toml", REQUIRED),
        ("/b.toml", "[cloud]\nport = 0\n"),
        ("/c.toml", "[cloud]\nport = 8883\n"),
    ])
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "/b.toml:2:8: key cloud.port: 0 is not a TCP port (1 to 65535)"
    );
}

#[test]
fn columns_count_characters_not_bytes() {
    assert_eq!(
        error_of("# Größe\n[cloud] # übrigens\nport = 0 # naïve\n"),
        "/d/20-site.toml:3:8: key cloud.port: 0 is not a TCP port (1 to 65535)"
    );
    assert_eq!(
        error_of("[provisioning.parameters]\nStadt = \"München\"\nSite = { files = \"/x\" }\n"),
        "/d/20-site.toml:3:10: key provisioning.parameters.Site.files: unknown key \
         (expected one of: file, command); did you mean file?"
    );
}

// ---- files, drop-ins, masking ---------------------------------------------------------------

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

#[test]
fn system_and_for_main_paths() {
    let system = ConfigPaths::system();
    assert_eq!(system.main, Path::new("/etc/iotd/config.toml"));
    assert_eq!(
        system.dropin_dirs,
        vec![
            PathBuf::from("/usr/lib/iotd/config.d"),
            PathBuf::from("/etc/iotd/config.d"),
            PathBuf::from("/run/iotd/config.d"),
        ]
    );
    let custom = ConfigPaths::for_main(Path::new("/srv/gw/iotd.toml"));
    assert_eq!(custom.main, Path::new("/srv/gw/iotd.toml"));
    assert_eq!(custom.dropin_dirs, vec![PathBuf::from("/srv/gw/config.d")]);
    let relative = ConfigPaths::for_main(Path::new("iotd.toml"));
    assert_eq!(relative.dropin_dirs, vec![PathBuf::from("config.d")]);
}

#[test]
fn drop_ins_merge_by_file_name_and_later_directories_mask_earlier_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (usr, etc, run) = (
        tmp.path().join("usr"),
        tmp.path().join("etc"),
        tmp.path().join("run"),
    );
    let paths = ConfigPaths {
        main: tmp.path().join("config.toml"),
        main_required: false,
        dropin_dirs: vec![usr.clone(), etc.clone(), run.clone()],
    };
    write(&paths.main, "[cloud]\nport = 1000\n");
    // Required keys from the image, as an image builder ships them.
    write(&usr.join("10-image.toml"), REQUIRED);
    // Masked by /etc's file of the same name: its keep-alive must not survive.
    write(
        &usr.join("20-site.toml"),
        "[cloud]\nkeep_alive_secs = 100\n[provisioning.parameters]\nSite = \"usr\"\n",
    );
    write(
        &etc.join("20-site.toml"),
        "[provisioning.parameters]\nSite = \"etc\"\n",
    );
    // File name order, not directory order: /run's 05 applies before /usr's 50.
    write(&run.join("05-early.toml"), "[cloud]\nport = 1111\n");
    write(&usr.join("50-late.toml"), "[cloud]\nport = 2222\n");
    // Masked by a symlink to /dev/null: its broken content must not be read.
    write(&usr.join("40-broken.toml"), "this is not toml");
    fs::create_dir_all(&etc).unwrap();
    symlink("/dev/null", etc.join("40-broken.toml")).unwrap();
    // Masked by an empty file.
    write(&etc.join("60-state.toml"), "[state]\ndir = \"/masked\"\n");
    write(&run.join("60-state.toml"), "");
    // Ignored: hidden files, other extensions, directories.
    write(&etc.join(".#70-lock.toml"), "garbage");
    write(&etc.join("70-backup.toml.bak"), "garbage");
    write(&etc.join("README"), "garbage");
    fs::create_dir_all(etc.join("80-dir.toml")).unwrap();

    let s = load(&paths).unwrap();
    assert_eq!(s.cloud.port, 2222);
    assert_eq!(s.cloud.keep_alive, Duration::from_secs(300));
    assert_eq!(
        s.provisioning.parameters.get("Site"),
        Some(&ParameterSource::Literal("etc".to_owned()))
    );
    assert_eq!(s.state_dir, Path::new("/var/lib/iotd"));
    assert_eq!(
        s.sources,
        vec![
            paths.main.clone(),
            run.join("05-early.toml"),
            usr.join("10-image.toml"),
            etc.join("20-site.toml"),
            usr.join("50-late.toml"),
        ]
    );
}

/// The system's paths, rooted in `dir`: its main file may be missing.
fn system_like(dir: &Path) -> ConfigPaths {
    ConfigPaths {
        main: dir.join("config.toml"),
        main_required: false,
        dropin_dirs: vec![dir.join("config.d")],
    }
}

#[test]
fn the_main_file_comes_before_drop_ins_and_may_be_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = system_like(tmp.path());
    write(&tmp.path().join("config.d/10-image.toml"), REQUIRED);
    let s = load(&paths).unwrap();
    assert_eq!(s.sources, vec![tmp.path().join("config.d/10-image.toml")]);

    write(
        &paths.main,
        "[cloud]\nport = 443\n[state]\ndir = \"/main\"\n",
    );
    write(
        &tmp.path().join("config.d/20-state.toml"),
        "[state]\ndir = \"/dropin\"\n",
    );
    let s = load(&paths).unwrap();
    assert_eq!(s.state_dir, Path::new("/dropin"));
    assert_eq!(s.cloud.port, 443);
    assert_eq!(s.sources.first(), Some(&paths.main));
}

#[test]
fn missing_directories_and_files_leave_only_the_required_keys_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = system_like(&tmp.path().join("nothing"));
    let error = load(&paths).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "missing required key cloud.endpoint (set it in {} or a config.d drop-in)",
            paths.main.display()
        )
    );
}

#[test]
fn a_main_file_given_by_name_must_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let main = tmp.path().join("typo.toml");
    // Even when drop-ins beside it supply every key: the file named is not what was read.
    write(&tmp.path().join("config.d/10-image.toml"), REQUIRED);
    let paths = ConfigPaths::for_main(&main);
    assert!(paths.main_required);
    assert!(!ConfigPaths::system().main_required);
    let error = load(&paths).unwrap_err();
    assert!(
        matches!(error, ConfigError::MissingFile { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("config file {} does not exist", main.display())
    );
    assert!(!error.is_transient());
}

#[test]
fn errors_in_drop_ins_name_the_drop_in() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = ConfigPaths::for_main(&tmp.path().join("config.toml"));
    write(&paths.main, REQUIRED);
    let dropin = tmp.path().join("config.d/20-site.toml");
    write(&dropin, "[provisioning]\n\ntempalte = \"x\"\n");
    let error = load(&paths).unwrap_err();
    assert!(
        error.to_string().starts_with(&format!(
            "{}:3:1: key provisioning.tempalte: unknown key",
            dropin.display()
        )),
        "{error}"
    );
}

#[test]
fn unreadable_files_and_directories_are_errors_naming_the_path_and_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory where the main file should be cannot be read, even by root.
    let main = tmp.path().join("config.toml");
    fs::create_dir_all(&main).unwrap();
    let error = load(&ConfigPaths::for_main(&main)).unwrap_err();
    assert!(matches!(error, ConfigError::ReadFile { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!(
            "reading config file {}: Is a directory (os error 21)",
            main.display()
        )
    );

    let main = tmp.path().join("ok/config.toml");
    write(&main, REQUIRED);
    let dropin = tmp.path().join("ok/config.d/20-latin1.toml");
    write(&dropin, "");
    fs::write(&dropin, b"# size\n# Gr\xf6\xdfe\n").unwrap();
    let error = load(&ConfigPaths::for_main(&main)).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "reading config file {}: it is not UTF-8 text (byte 0xf6 at line 2, column 5); \
             save it as UTF-8",
            dropin.display()
        )
    );
    // Columns count characters, as in other errors.
    fs::write(&dropin, b"# Gr\xc3\xb6\xc3\x9fe \xff").unwrap();
    let error = load(&ConfigPaths::for_main(&main)).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("(byte 0xff at line 1, column 9)"),
        "{error}"
    );

    let not_a_dir = tmp.path().join("file");
    write(&not_a_dir, "");
    let error = load(&ConfigPaths {
        main: tmp.path().join("absent.toml"),
        main_required: false,
        dropin_dirs: vec![not_a_dir.clone()],
    })
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "listing config drop-in directory {}: Not a directory (os error 20)",
            not_a_dir.display()
        )
    );
}

// ---- template parameters ----------------------------------------------------------------------

fn params(list: &[(&str, ParameterSource)]) -> BTreeMap<String, ParameterSource> {
    list.iter()
        .map(|(name, source)| ((*name).to_owned(), source.clone()))
        .collect()
}

fn command(argv: &[&str]) -> ParameterSource {
    ParameterSource::Command(argv.iter().map(|a| (*a).to_owned()).collect())
}

#[test]
fn literal_file_and_command_values_are_resolved_and_trimmed() {
    let tmp = tempfile::tempdir().unwrap();
    let serial = tmp.path().join("product_serial");
    fs::write(&serial, "  SN-0042 \n").unwrap();
    // Device-tree strings end in a NUL byte.
    let model = tmp.path().join("model");
    fs::write(&model, "Raspberry Pi 4\0").unwrap();
    let resolved = resolve_all(
        &params(&[
            ("Site", ParameterSource::Literal(" berlin ".to_owned())),
            ("Serial", ParameterSource::File(serial)),
            ("Model", ParameterSource::File(model)),
            (
                "Board",
                command(&["sh", "-c", "printf '\\n  rev-b  \\n\\n'"]),
            ),
        ]),
        Duration::from_secs(5),
    )
    .unwrap();
    let expected = BTreeMap::from([
        ("Board".to_owned(), "rev-b".to_owned()),
        ("Model".to_owned(), "Raspberry Pi 4".to_owned()),
        ("Serial".to_owned(), "SN-0042".to_owned()),
        // Literals are taken as written.
        ("Site".to_owned(), " berlin ".to_owned()),
    ]);
    assert_eq!(resolved, expected);
}

#[test]
fn resolve_parameters_uses_the_settings() {
    let s = with(
        "[provisioning.parameters]\nSite = \"berlin\"\nEcho = { command = [\"echo\", \"hi\"] }\n",
    );
    let resolved = s.provisioning.resolve_parameters().unwrap();
    assert_eq!(resolved.get("Site").map(String::as_str), Some("berlin"));
    assert_eq!(resolved.get("Echo").map(String::as_str), Some("hi"));
}

/// The error of resolving the one parameter `X` from `source`, with a 5 s timeout.
fn error_resolving(source: ParameterSource) -> ConfigError {
    // A script this test process just wrote can be "busy" (ETXTBSY) for a moment: another test
    // thread's fork may still hold the writing descriptor until its exec. iotd treats that as
    // transient and tries again; so does this helper.
    for _ in 0..100 {
        match resolve_all(&params(&[("X", source.clone())]), Duration::from_secs(5)) {
            Ok(values) => panic!("expected an error, got {values:?}"),
            Err(error) if error.to_string().contains("(os error 26)") => {
                assert!(
                    error.is_transient(),
                    "a busy executable is transient: {error}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => return error,
        }
    }
    panic!("the script stayed busy (ETXTBSY)")
}

#[test]
fn a_missing_or_empty_file_is_an_error_naming_parameter_file_and_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let error = resolve_all(
        &params(&[("Serial", ParameterSource::File(missing.clone()))]),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "resolving template parameter provisioning.parameters.Serial: reading file {}: \
             No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(error.parameter(), Some("Serial"));
    // A sysfs node may appear once its driver has probed.
    assert!(error.is_transient());

    let empty = tmp.path().join("empty");
    fs::write(&empty, " \n").unwrap();
    let error = resolve_all(
        &params(&[("Serial", ParameterSource::File(empty.clone()))]),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "resolving template parameter provisioning.parameters.Serial: file {} holds no \
             value (only whitespace)",
            empty.display()
        )
    );
    assert!(error.is_transient());

    // A directory is a wrong path: no retry mends it.
    let error = error_resolving(ParameterSource::File(tmp.path().to_path_buf()));
    assert_eq!(
        error.to_string(),
        format!(
            "resolving template parameter provisioning.parameters.X: reading file {}: \
             Is a directory (os error 21)",
            tmp.path().display()
        )
    );
    assert!(!error.is_transient());
}

#[test]
fn a_file_over_the_limit_or_not_utf8_is_a_permanent_error() {
    let tmp = tempfile::tempdir().unwrap();
    let at_limit = tmp.path().join("at-limit");
    fs::write(&at_limit, "x".repeat(MAX_PARAMETER_BYTES)).unwrap();
    let values = resolve_all(
        &params(&[("X", ParameterSource::File(at_limit))]),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(values["X"].len(), MAX_PARAMETER_BYTES);

    let big = tmp.path().join("big");
    fs::write(&big, "x".repeat(MAX_PARAMETER_BYTES + 1)).unwrap();
    let error = error_resolving(ParameterSource::File(big.clone()));
    assert_eq!(
        error.to_string(),
        format!(
            "resolving template parameter provisioning.parameters.X: file {} holds over 64 KiB; \
             is it the right file?",
            big.display()
        )
    );
    assert!(!error.is_transient());

    let latin1 = tmp.path().join("latin1");
    fs::write(&latin1, b"Gr\xf6\xdfe").unwrap();
    let error = error_resolving(ParameterSource::File(latin1));
    assert!(
        error.to_string().ends_with("holds text that is not UTF-8"),
        "{error}"
    );
    assert!(!error.is_transient());
}

#[test]
fn a_failing_command_is_a_transient_error_with_status_and_first_stderr_line() {
    let error = resolve_all(
        &params(&[(
            "Serial",
            command(&[
                "sh",
                "-c",
                "echo partial; echo >&2; echo 'no serial: board not ready' >&2; echo more >&2; exit 3",
            ]),
        )]),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "resolving template parameter provisioning.parameters.Serial: command `sh -c 'echo \
         partial; echo >&2; echo '\\''no serial: board not ready'\\'' >&2; echo more >&2; exit \
         3'` failed (exit status: 3): no serial: board not ready"
    );
    assert!(error.is_transient());
    assert_eq!(error.parameter(), Some("Serial"));
    let error = error_resolving(command(&["false"]));
    assert_eq!(
        error.to_string(),
        "resolving template parameter provisioning.parameters.X: command `false` failed \
         (exit status: 1)"
    );
    assert!(error.is_transient());
}

#[test]
fn a_command_that_cannot_start_is_a_permanent_error_with_the_cause() {
    let error = error_resolving(command(&["/nonexistent/iotd-serial"]));
    assert!(
        matches!(error, ConfigError::ParameterCommand { .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "resolving template parameter provisioning.parameters.X: running command \
         `/nonexistent/iotd-serial`: No such file or directory (os error 2); install it, or \
         give the program's absolute path"
    );
    assert!(!error.is_transient());
    assert_eq!(error.parameter(), Some("X"));

    let tmp = tempfile::tempdir().unwrap();
    // Not executable.
    let script = tmp.path().join("serial.sh");
    fs::write(&script, "#!/bin/sh\necho x\n").unwrap();
    let error = error_resolving(command(&[script.to_str().unwrap()]));
    assert!(
        error
            .to_string()
            .ends_with("Permission denied (os error 13); make it executable by user iotd"),
        "{error}"
    );
    assert!(!error.is_transient());
    // Executable, but not a program the kernel can run (no #! line).
    let script = tmp.path().join("no-interpreter");
    fs::write(&script, "echo x\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let error = error_resolving(command(&[script.to_str().unwrap()]));
    assert!(error.to_string().contains("Exec format error"), "{error}");
    assert!(!error.is_transient());
}

#[test]
fn a_command_that_prints_nothing_or_not_utf8_is_a_transient_error() {
    let error = error_resolving(command(&["true"]));
    assert_eq!(
        error.to_string(),
        "resolving template parameter provisioning.parameters.X: command `true` printed no \
         value (only whitespace)"
    );
    assert!(error.is_transient());
    let error = error_resolving(command(&["printf", "Gr\\366\\337e"]));
    assert!(
        error
            .to_string()
            .ends_with("printed text that is not UTF-8"),
        "{error}"
    );
    assert!(error.is_transient());
}

#[test]
fn a_command_that_prints_too_much_is_reported_as_such_whatever_its_exit() {
    // `yes` never ends on its own: it dies of SIGPIPE or is killed, and that is not the
    // failure to report.
    let error = error_resolving(command(&["yes", "serial"]));
    assert_eq!(
        error.to_string(),
        "resolving template parameter provisioning.parameters.X: command `yes serial` printed \
         output over 64 KiB; is it the right command?"
    );
    assert!(error.is_transient());
    // One that ends by itself, successfully, with a byte too many.
    let error = error_resolving(command(&[
        "sh",
        "-c",
        "head -c 65537 /dev/zero | tr '\\0' x",
    ]));
    assert!(
        error.to_string().contains("printed output over 64 KiB"),
        "{error}"
    );
    let values = resolve_all(
        &params(&[(
            "X",
            command(&["sh", "-c", "head -c 65536 /dev/zero | tr '\\0' x"]),
        )]),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(values["X"].len(), MAX_PARAMETER_BYTES);
}

/// Whether process `pid` is still running (not gone, and not a zombie waiting to be reaped by
/// whoever adopted it). Waits up to 5 s for it to end, since a killed process takes a moment.
fn still_running_after_a_while(pid: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running = fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            // The state follows the command name in parentheses, which may contain spaces.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            !matches!(state, Some('Z' | 'X'))
        });
        if !running || Instant::now() >= deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_command_that_runs_too_long_is_killed_with_its_process_group() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pid");
    let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
    let started = Instant::now();
    let error = resolve_all(
        &params(&[("X", command(&["sh", "-c", &script]))]),
        Duration::from_millis(300),
    )
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(
        error.to_string(),
        format!(
            "resolving template parameter provisioning.parameters.X: command `sh -c 'sleep 30 & \
             echo $! > {}; wait'` did not finish within 300ms; killed it",
            pid_file.display()
        )
    );
    assert!(error.is_transient());
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let background = fs::read_to_string(&pid_file).unwrap();
    assert!(
        !still_running_after_a_while(background.trim()),
        "the background sleep {background} outlived the command"
    );
}

#[test]
fn what_a_command_printed_counts_even_if_a_background_process_keeps_its_output_open() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pid");
    let script = format!(
        "echo serial-123; sleep 30 & echo $! > {}",
        pid_file.display()
    );
    let started = Instant::now();
    let values = resolve_all(
        &params(&[("Serial", command(&["sh", "-c", &script]))]),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(values["Serial"], "serial-123");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The background process was killed with the command's group, not left behind.
    let background = fs::read_to_string(&pid_file).unwrap();
    assert!(
        !still_running_after_a_while(background.trim()),
        "the background sleep {background} outlived the command"
    );
}

#[test]
fn configuration_errors_are_permanent_and_name_no_parameter() {
    let errors = [
        load_parts(&[("/etc/iotd/config.toml", "[cloud]\n")]).unwrap_err(),
        load_parts(&[("/a.toml", "[cloud]\nport = 0\n")]).unwrap_err(),
        load_parts(&[("/a.toml", "[cloud\n")]).unwrap_err(),
    ];
    for error in errors {
        assert!(!error.is_transient(), "{error}");
        assert_eq!(error.parameter(), None, "{error}");
    }
}

#[test]
fn parameter_names_that_are_not_bare_keys_are_quoted_in_messages() {
    let error = resolve_all(
        &params(&[("Serial Number", command(&["false"]))]),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(
        error.to_string().starts_with(
            "resolving template parameter provisioning.parameters.\"Serial Number\": "
        ),
        "{error}"
    );
    assert_eq!(error.parameter(), Some("Serial Number"));
}

#[test]
fn commands_are_shown_as_a_shell_would_read_them() {
    let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(display_command(&argv(&["cat", "/x/y"])), "`cat /x/y`");
    assert_eq!(
        display_command(&argv(&["sh", "-c", "a b", ""])),
        "`sh -c 'a b' ''`"
    );
    assert_eq!(display_command(&argv(&["it's"])), "`'it'\\''s'`");
}

// ---- the shipped reference file -------------------------------------------------------------

const SHIPPED: &str = include_str!("../../../config/iotd.toml");

/// The shipped file with every commented-out setting (`#key = value`, `#[table]`) switched on;
/// prose comments start with `# `.
fn shipped_uncommented() -> String {
    SHIPPED
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '[') => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_shipped_file_parses_and_changes_nothing_as_shipped() {
    let s = load_parts(&[
        ("/etc/iotd/config.toml", SHIPPED),
        ("/d/10-required.toml", REQUIRED),
    ])
    .unwrap();
    assert_eq!(s.cloud.port, 8883);
    assert!(s.provisioning.parameters.is_empty());
    assert!(s.provisioning.claim.is_none());
}

#[test]
fn the_shipped_file_documents_the_real_defaults() {
    let text = shipped_uncommented();
    assert_ne!(text, SHIPPED, "no commented-out settings found");
    let documented = load_parts(&[
        ("/etc/iotd/config.toml", &text),
        ("/d/10-required.toml", REQUIRED),
    ])
    .unwrap();
    let defaults = load_parts(&[("/d/10-required.toml", REQUIRED)]).unwrap();
    let (d, b) = (&documented, &defaults);
    assert_eq!(d.cloud.port, b.cloud.port);
    assert_eq!(d.cloud.alpn, b.cloud.alpn);
    assert_eq!(d.cloud.keep_alive, b.cloud.keep_alive);
    assert_eq!(d.cloud.reply_timeout, b.cloud.reply_timeout);
    assert_eq!(d.cloud.throttle_retry_max, b.cloud.throttle_retry_max);
    assert_eq!(
        d.provisioning.certificate_source,
        b.provisioning.certificate_source
    );
    assert_eq!(d.provisioning.delete_claim, b.provisioning.delete_claim);
    assert_eq!(
        d.provisioning.reprovision_when_key_lost,
        b.provisioning.reprovision_when_key_lost
    );
    assert_eq!(d.provisioning.format, b.provisioning.format);
    assert_eq!(d.key, b.key);
    assert_eq!(d.state_dir, b.state_dir);
    assert_eq!(
        d.rotation,
        RotationSettings {
            // An example: its default is provisioning.template.
            template: Some("gw-rotation".to_owned()),
            ..b.rotation.clone()
        }
    );
    // Keys without a default are shown with examples that must be valid.
    assert_eq!(
        d.cloud.ca_bundle,
        Some(PathBuf::from("/etc/iotd/AmazonRootCA.pem"))
    );
    assert!(d.provisioning.claim.is_some());
    assert_eq!(d.provisioning.parameters.len(), 3);
    assert!(matches!(
        d.onboarding.serial,
        Some(ParameterSource::File(ref path)) if path.is_absolute()
    ));
    assert_eq!(b.onboarding.serial, None);
    // The documented TPM defaults are the real ones.
    let tpm = load_parts(&[
        ("/etc/iotd/config.toml", &text),
        ("/d/10-required.toml", REQUIRED),
        ("/d/20-tpm.toml", "[key]\nbackend = \"tpm\"\n"),
    ])
    .unwrap();
    assert_eq!(
        tpm.key,
        KeySettings::Tpm {
            tcti: DEFAULT_TCTI.to_owned(),
            persistent_handle: Some(0x8101_0001)
        }
    );
    let tpm_defaults = with("[key]\nbackend = \"tpm\"\n");
    assert!(matches!(tpm_defaults.key, KeySettings::Tpm { ref tcti, .. } if tcti == DEFAULT_TCTI));
    // Both required keys are shown.
    for required in ["#endpoint = ", "#template = "] {
        assert!(SHIPPED.contains(required), "{required} is not shown");
    }
}

#[test]
fn the_shipped_file_documents_every_key() {
    // The parser lists its keys when it meets an unknown one; each must appear in the file.
    for (table, probe) in [
        ("", "zzz = 1\n"),
        ("cloud", "[cloud]\nzzz = 1\n"),
        ("provisioning", "[provisioning]\nzzz = 1\n"),
        (
            "provisioning.parameters.X",
            "[provisioning.parameters]\nX = { zzz = 1 }\n",
        ),
        ("key", "[key]\nzzz = 1\n"),
        ("state", "[state]\nzzz = 1\n"),
        ("onboarding", "[onboarding]\nzzz = 1\n"),
        ("rotation", "[rotation]\nzzz = 1\n"),
    ] {
        let message = error_of(probe);
        let list = message
            .split_once("expected one of: ")
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(list, _)| list)
            .unwrap_or_else(|| panic!("no key list in {message:?}"));
        for key in list.split(", ") {
            let shown = match table {
                "" => SHIPPED.contains(&format!("[{key}]")),
                "provisioning.parameters.X" => SHIPPED.contains(&format!("{{ {key} = ")),
                "provisioning" if key == "parameters" => {
                    SHIPPED.contains("[provisioning.parameters]")
                }
                _ => SHIPPED.contains(&format!("\n#{key} = ")),
            };
            assert!(shown, "{table}.{key} is not documented in config/iotd.toml");
        }
    }
}

#[test]
fn the_report_topic_defaults_and_is_checked() {
    let s = load_parts(&[("/etc/iotd/config.toml", REQUIRED)]).unwrap();
    assert_eq!(s.cloud.report_topic, "iotd/{thing}/certificates");
    let s = load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        ("/d/20-site.toml", "[cloud]\nreport_topic = \"\"\n"),
    ])
    .unwrap();
    assert_eq!(s.cloud.report_topic, "", "empty: reports off");
    for (topic, says) in [
        ("$aws/things/{thing}/x", "starts with $"),
        ("fleet/+/x", "wildcard"),
        ("fleet/{name}/x", "only placeholder"),
        ("a/b/c/d/e/f/g/h/i", "more than 7 slashes"),
    ] {
        let e = error_of(&format!("[cloud]\nreport_topic = {topic:?}\n"));
        assert!(
            e.contains("cloud.report_topic") && e.contains(says),
            "{topic}: {e}"
        );
    }
}

// ---- [onboarding] ---------------------------------------------------------------------------

/// `[onboarding]` as REQUIRED leaves it.
fn onboarding_defaults() -> OnboardingSettings {
    let s = load_parts(&[("/etc/iotd/config.toml", REQUIRED)]).unwrap();
    OnboardingSettings {
        serial: None,
        model: None,
        listen: "0.0.0.0:8443".parse().unwrap(),
        allowed_templates: vec![s.provisioning.template.clone()],
        allowed_endpoints: vec![s.cloud.endpoint.clone()],
        installer_parameters: Vec::new(),
        page_interfaces: Vec::new(),
        page_shared_interfaces: Vec::new(),
        page_port: crate::config::DEFAULT_PAGE_PORT,
    }
}

#[test]
fn onboarding_addresses_and_allowances_default_and_are_checked() {
    let s = with(
        "[onboarding]\nlisten = \"[::]:9443\"\nallowed_templates = [\"a\", \"b-2\"]\n\
         allowed_endpoints = [\"x-ats.iot.eu-west-1.amazonaws.com\"]\n\
         installer_parameters = [\"Site\"]\n",
    );
    assert_eq!(s.onboarding.listen, "[::]:9443".parse().unwrap());
    assert_eq!(s.onboarding.allowed_templates, ["a", "b-2"]);
    assert_eq!(
        s.onboarding.allowed_endpoints,
        ["x-ats.iot.eu-west-1.amazonaws.com"]
    );
    assert_eq!(s.onboarding.installer_parameters, ["Site"]);
    for (text, says) in [
        ("listen = \"0.0.0.0:443\"", "below 1024"),
        ("listen = \"gateway:8443\"", "not an address and port"),
        (
            "allowed_templates = [\"no spaces\"]",
            "onboarding.allowed_templates",
        ),
        ("allowed_endpoints = [\"https://x\"]", "is a URL"),
        ("installer_parameters = [\"\"]", "cannot be empty"),
    ] {
        let e = error_of(&format!("[onboarding]\n{text}\n"));
        assert!(e.contains(says), "{text}: {e}");
    }
}

#[test]
fn the_installers_page_is_off_by_default_and_its_interfaces_are_checked() {
    let defaults = onboarding_defaults();
    assert!(defaults.page_interfaces.is_empty() && defaults.page_shared_interfaces.is_empty());
    assert_eq!(defaults.page_port, 8080);
    let s = with(
        "[onboarding]\npage_interfaces = [\"uap0\", \"usb0\"]\n\
         page_shared_interfaces = [\"eth0\"]\npage_port = 8000\n",
    );
    assert_eq!(s.onboarding.page_interfaces, ["uap0", "usb0"]);
    assert_eq!(s.onboarding.page_shared_interfaces, ["eth0"]);
    assert_eq!(s.onboarding.page_port, 8000);
    for (text, says) in [
        (
            "page_interfaces = [\"\"]",
            "is not a network interface's name",
        ),
        (
            "page_interfaces = [\"a-very-long-name0\"]",
            "1 to 15 characters",
        ),
        ("page_interfaces = [\"eth0:1\"]", "no '/', ':' or spaces"),
        ("page_shared_interfaces = [\"..\"]", "no '/', ':' or spaces"),
        ("page_interfaces = \"usb0\"", "expected a sequence"),
        ("page_port = 0", "not a TCP port"),
        ("page_port = 70000", "not a TCP port"),
        (
            "page_interfaces = [\"usb0\"]\npage_shared_interfaces = [\"eth0\", \"usb0\"]",
            "key onboarding.page_shared_interfaces: \"usb0\" is also in onboarding.page_interfaces",
        ),
    ] {
        let e = error_of(&format!("[onboarding]\n{text}\n"));
        assert!(e.contains(says), "{text}: {e}");
    }
}

#[test]
fn the_onboarding_serial_defaults_to_none() {
    let s = load_parts(&[("/etc/iotd/config.toml", REQUIRED)]).unwrap();
    assert_eq!(s.onboarding, onboarding_defaults());
    assert_eq!(s.onboarding.resolve_serial().unwrap(), None);
    assert_eq!(with("[onboarding]\n").onboarding.serial, None);
}

#[test]
fn the_onboarding_serial_is_written_like_a_template_parameter() {
    assert_eq!(
        with("[onboarding]\nserial = \"IOTGW-0001234\"\n")
            .onboarding
            .serial,
        Some(ParameterSource::Literal("IOTGW-0001234".to_owned()))
    );
    assert_eq!(
        with("[onboarding]\nserial = { file = \"/sys/class/dmi/id/product_serial\" }\n")
            .onboarding
            .serial,
        Some(ParameterSource::File(PathBuf::from(
            "/sys/class/dmi/id/product_serial"
        )))
    );
    assert_eq!(
        with("onboarding.serial = { command = [\"/usr/bin/get-serial\", \"-q\"] }\n")
            .onboarding
            .serial,
        Some(command(&["/usr/bin/get-serial", "-q"]))
    );
    // A later file replaces it.
    let s = load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        ("/d/10-image.toml", "[onboarding]\nserial = \"A-1\"\n"),
        ("/d/20-site.toml", "[onboarding]\nserial = \"B-2\"\n"),
    ])
    .unwrap();
    assert_eq!(
        s.onboarding.serial,
        Some(ParameterSource::Literal("B-2".to_owned()))
    );
}

#[test]
fn a_bad_onboarding_serial_is_refused_where_it_is_written() {
    for (text, says) in [
        (
            "[onboarding]\nserial = \"GW 1\"\n",
            "/d/20-site.toml:2:10: key onboarding.serial: \"GW 1\" cannot be a serial: it has \
             characters other than printable ASCII (or spaces)",
        ),
        (
            "[onboarding]\nserial = \"\"\n",
            "key onboarding.serial: \"\" cannot be a serial: it is empty",
        ),
        (
            "[onboarding]\nserial = \"A:B\"\n",
            "key onboarding.serial: \"A:B\" cannot be a serial: it contains ':'",
        ),
        (
            "[onboarding]\nserial = { file = \"serial.txt\" }\n",
            "key onboarding.serial.file: \"serial.txt\" is not an absolute path",
        ),
        (
            "[onboarding]\nserial = { command = [] }\n",
            "key onboarding.serial.command: an empty command names no program",
        ),
        ("[onboarding]\nserial = 42\n", "key onboarding.serial"),
        (
            "[onboarding]\nserail = \"A\"\n",
            "unknown key (expected one of: serial, model, listen, allowed_templates, \
             allowed_endpoints, installer_parameters, page_interfaces, page_shared_interfaces, \
             page_port); did you mean serial?",
        ),
        ("onboarding = [1]\n", "expected a [onboarding] table"),
    ] {
        let error = error_of(text);
        assert!(error.contains(says), "{text:?}: {error}");
    }
}

#[test]
fn the_onboarding_model_is_written_and_resolved_like_the_serial() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model");
    fs::write(&file, "Raspberry Pi 4 Model B Rev 1.4\0").unwrap();
    let s = with(&format!(
        "[onboarding]\nmodel = {{ file = \"{}\" }}\n",
        file.display()
    ));
    assert_eq!(
        s.onboarding.model,
        Some(ParameterSource::File(file.clone()))
    );
    assert_eq!(
        s.onboarding.resolve_model().unwrap().as_deref(),
        Some("Raspberry Pi 4 Model B Rev 1.4")
    );
    assert_eq!(onboarding_defaults().resolve_model().unwrap(), None);
    let e = error_of("[onboarding]\nmodel = { file = \"model.txt\" }\n");
    assert!(
        e.contains("key onboarding.model.file: \"model.txt\" is not an absolute path"),
        "{e}"
    );
    let missing = tmp.path().join("missing");
    let error = OnboardingSettings {
        model: Some(ParameterSource::File(missing.clone())),
        ..onboarding_defaults()
    }
    .resolve_model()
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "resolving onboarding.model: reading file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(error.parameter(), None, "not a template parameter");
}

#[test]
fn resolving_the_onboarding_serial_reads_files_and_runs_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("serial");
    fs::write(&file, "IOTGW-0001234\n\0").unwrap();
    let from_file = OnboardingSettings {
        serial: Some(ParameterSource::File(file)),
        ..onboarding_defaults()
    };
    assert_eq!(
        from_file.resolve_serial().unwrap().as_deref(),
        Some("IOTGW-0001234")
    );
    let from_command = OnboardingSettings {
        serial: Some(command(&["echo", " IOTGW-42 "])),
        ..onboarding_defaults()
    };
    assert_eq!(
        from_command.resolve_serial().unwrap().as_deref(),
        Some("IOTGW-42")
    );
    let literal = OnboardingSettings {
        serial: Some(ParameterSource::Literal("GW-7".to_owned())),
        ..onboarding_defaults()
    };
    assert_eq!(literal.resolve_serial().unwrap().as_deref(), Some("GW-7"));
}

#[test]
fn an_onboarding_serial_that_cannot_be_resolved_names_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let error = OnboardingSettings {
        serial: Some(ParameterSource::File(missing.clone())),
        ..onboarding_defaults()
    }
    .resolve_serial()
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "resolving onboarding.serial: reading file {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    assert_eq!(error.parameter(), None, "not a template parameter");
    assert!(error.is_transient(), "as for a template parameter");

    let error = OnboardingSettings {
        serial: Some(command(&["sh", "-c", "echo 'no eeprom' >&2; exit 3"])),
        ..onboarding_defaults()
    }
    .resolve_serial()
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "resolving onboarding.serial: command `sh -c 'echo '\\''no eeprom'\\'' >&2; exit 3'` \
         failed (exit status: 3): no eeprom"
    );

    let error = OnboardingSettings {
        serial: Some(command(&["sleep", "5"])),
        ..onboarding_defaults()
    }
    .resolve_serial_within(Duration::from_millis(200))
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("resolving onboarding.serial: command `sleep 5` did not finish"),
        "{error}"
    );
    assert!(
        !ConfigError::OnboardingSerial {
            cause: Box::new(ConfigError::ParameterCommand {
                name: "serial".to_owned(),
                command: "`x`".to_owned(),
                error: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
        .is_transient()
    );
}

// ---- [rotation] -----------------------------------------------------------------------------

fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

#[test]
fn rotation_defaults_apply_when_nothing_is_set() {
    let expected = RotationSettings {
        renew_before: Span::Percent(20),
        max_age: None,
        jitter: Span::Percent(10),
        retry_interval: hours(1),
        template: None,
        report_topic: DEFAULT_ROTATION_REPORT_TOPIC.to_owned(),
        grace_period: days(7),
        trust_clock: false,
    };
    let s = load_parts(&[("/etc/iotd/config.toml", REQUIRED)]).unwrap();
    assert_eq!(s.rotation, expected);
    assert_eq!(s.rotation.report_topic, "iotd/{thing}/rotation");
    assert_eq!(with("[rotation]\n").rotation, expected);
}

#[test]
fn every_rotation_key_is_read() {
    let s = with(
        r#"
        [rotation]
        renew_before = "30d"
        max_age = "365d"
        jitter = "6h"
        retry_interval = "90m"
        template = "gw-rotation"
        report_topic = "fleet/{thing}/rotated"
        grace_period = "0"
        trust_clock = true
        "#,
    );
    assert_eq!(
        s.rotation,
        RotationSettings {
            renew_before: Span::Duration(days(30)),
            max_age: Some(days(365)),
            jitter: Span::Duration(hours(6)),
            retry_interval: Duration::from_secs(90 * 60),
            template: Some("gw-rotation".to_owned()),
            report_topic: "fleet/{thing}/rotated".to_owned(),
            grace_period: Duration::ZERO,
            trust_clock: true,
        }
    );
    assert_eq!(
        with("rotation.report_topic = \"\"\n").rotation.report_topic,
        "",
        "empty: reports off"
    );
}

#[test]
fn rotation_spans_are_percentages_or_durations() {
    let read = |key: &str, value: &str| {
        let s = with(&format!("[rotation]\n{key} = {value}\n")).rotation;
        if key == "renew_before" {
            s.renew_before
        } else {
            s.jitter
        }
    };
    for (key, value, span) in [
        ("renew_before", "\"1%\"", Span::Percent(1)),
        ("renew_before", "\"99%\"", Span::Percent(99)),
        ("renew_before", "\"12h\"", Span::Duration(hours(12))),
        (
            "renew_before",
            "\"1d12h\"",
            Span::Duration(Duration::from_secs(36 * 3600)),
        ),
        (
            "renew_before",
            "\"90m\"",
            Span::Duration(Duration::from_secs(5400)),
        ),
        ("jitter", "\"0%\"", Span::Percent(0)),
        ("jitter", "\"100%\"", Span::Percent(100)),
        ("jitter", "\"0\"", Span::Duration(Duration::ZERO)),
        ("jitter", "0", Span::Duration(Duration::ZERO)),
        ("jitter", "\"45s\"", Span::Duration(Duration::from_secs(45))),
    ] {
        assert_eq!(read(key, value), span, "{key} = {value}");
    }
}

#[test]
fn rotation_durations_take_units_or_seconds() {
    let read = |value: &str| {
        with(&format!("[rotation]\ngrace_period = {value}\n"))
            .rotation
            .grace_period
    };
    assert_eq!(read("\"45s\""), Duration::from_secs(45));
    assert_eq!(read("\"90m\""), Duration::from_secs(5400));
    assert_eq!(read("\"12h\""), hours(12));
    assert_eq!(read("\"30d\""), days(30));
    assert_eq!(read("\"1d12h30m15s\""), Duration::from_secs(131_415));
    assert_eq!(read("3600"), hours(1));
    assert_eq!(read("\"3600\""), hours(1));
    assert_eq!(read("0"), Duration::ZERO);
    assert_eq!(
        with("[rotation]\nretry_interval = 10\n")
            .rotation
            .retry_interval,
        Duration::from_secs(10)
    );
    assert_eq!(
        with("[rotation]\nretry_interval = \"30d\"\n")
            .rotation
            .retry_interval,
        days(30)
    );
    assert_eq!(
        with("[rotation]\nmax_age = \"1h\"\n").rotation.max_age,
        Some(hours(1))
    );
}

#[test]
fn the_duration_parser_reads_units_and_refuses_the_rest() {
    use super::inputs::duration_text;
    assert_eq!(duration_text("0"), Ok(Duration::ZERO));
    assert_eq!(
        duration_text("90"),
        Ok(Duration::from_secs(90)),
        "digits alone are seconds"
    );
    assert_eq!(duration_text("2d"), Ok(days(2)));
    assert_eq!(duration_text("1h1h"), Ok(hours(2)));
    assert_eq!(duration_text("36500d"), Ok(days(36_500)));
    for bad in [
        "", "d", "1x", "1.5h", "-1d", "+1d", "1 d", "1d ", "1D", "12h30", "1ms", "1w",
    ] {
        assert_eq!(
            duration_text(bad),
            Err(format!(
                "{bad:?} is not a duration (like \"30d\", \"12h\", \"90m\", \"45s\" or \"1d12h\")"
            )),
        );
    }
    for long in [
        "36501d",
        "99999999999999999999999999d",
        "999999999999999999999",
    ] {
        assert_eq!(
            duration_text(long),
            Err(format!(
                "{long:?} is longer than the 100 years iotd accepts"
            )),
        );
    }
}

#[test]
fn bad_rotation_values_are_refused_with_the_key_and_what_is_accepted() {
    let neither = "is neither a percentage (\"20%\") nor a duration (\"30d\", \"12h\")";
    let expired = "would renew the certificate only once it has expired, when it can no longer \
                   connect; give 1% to 99% or a duration";
    let not_duration = "is not a duration (like \"30d\", \"12h\", \"90m\", \"45s\" or \"1d12h\")";
    let cases = [
        (
            "renew_before = \"20\"",
            format!("2:16: key rotation.renew_before: \"20\" {neither}"),
        ),
        (
            "renew_before = 20",
            format!("2:16: key rotation.renew_before: 20 {neither}"),
        ),
        (
            "renew_before = \"20x\"",
            format!("2:16: key rotation.renew_before: \"20x\" {neither}"),
        ),
        (
            "renew_before = \"0%\"",
            format!("2:16: key rotation.renew_before: \"0%\" {expired}"),
        ),
        (
            "renew_before = \"0s\"",
            format!("2:16: key rotation.renew_before: \"0s\" {expired}"),
        ),
        (
            "renew_before = 0",
            format!("2:16: key rotation.renew_before: 0 {expired}"),
        ),
        (
            "renew_before = \"100%\"",
            "2:16: key rotation.renew_before: \"100%\" would renew every certificate as soon as \
             it is issued; give 1% to 99% or a duration"
                .to_owned(),
        ),
        (
            "renew_before = \"150%\"",
            "2:16: key rotation.renew_before: \"150%\" is more than 100%".to_owned(),
        ),
        (
            "renew_before = \"12.5%\"",
            "2:16: key rotation.renew_before: \"12.5%\" is not a whole percentage (like \"20%\")"
                .to_owned(),
        ),
        (
            "renew_before = true",
            "2:16: key rotation.renew_before: expected a percentage like \"20%\" or a duration \
             like \"30d\", found a boolean"
                .to_owned(),
        ),
        (
            "max_age = \"50%\"",
            "2:11: key rotation.max_age: \"50%\" is a percentage, but max_age is an age (since \
             the certificate's notBefore); give a duration like \"365d\", or \"off\""
                .to_owned(),
        ),
        (
            "max_age = 365",
            "2:11: key rotation.max_age: 365 is shorter than an hour, which would renew every \
             certificate again and again; give a duration like \"365d\", or \"off\""
                .to_owned(),
        ),
        (
            "max_age = \"0\"",
            "2:11: key rotation.max_age: \"0\" is shorter than an hour, which would renew every \
             certificate again and again; give a duration like \"365d\", or \"off\""
                .to_owned(),
        ),
        (
            "max_age = \"1y\"",
            format!("2:11: key rotation.max_age: \"1y\" {not_duration}"),
        ),
        (
            "jitter = \"101%\"",
            "2:10: key rotation.jitter: \"101%\" is more than 100%".to_owned(),
        ),
        (
            "jitter = \"6\"",
            format!("2:10: key rotation.jitter: \"6\" {neither}"),
        ),
        (
            "jitter = -1",
            format!("2:10: key rotation.jitter: -1 {neither}"),
        ),
        (
            "retry_interval = \"9s\"",
            "2:18: key rotation.retry_interval: \"9s\" is out of range (10s to 30d)".to_owned(),
        ),
        (
            "retry_interval = \"30d1s\"",
            "2:18: key rotation.retry_interval: \"30d1s\" is out of range (10s to 30d)".to_owned(),
        ),
        (
            "retry_interval = -3",
            "2:18: key rotation.retry_interval: -3 is not a duration (it is negative)".to_owned(),
        ),
        (
            "retry_interval = [1]",
            "2:18: key rotation.retry_interval: expected a duration like \"30d\", found an array"
                .to_owned(),
        ),
        (
            "template = \"gw rotation\"",
            "2:12: key rotation.template: \"gw rotation\" is not a provisioning template name \
             (1 to 36 of A-Z a-z 0-9 _ -)"
                .to_owned(),
        ),
        (
            "report_topic = \"$aws/things/{thing}/x\"",
            "2:16: key rotation.report_topic: \"$aws/things/{thing}/x\" starts with $, which AWS \
             IoT reserves"
                .to_owned(),
        ),
        (
            "report_topic = \"fleet/+/rotation\"",
            "2:16: key rotation.report_topic: \"fleet/+/rotation\" has a wildcard (+ or #); a \
             report goes to one topic"
                .to_owned(),
        ),
        (
            "grace_period = \"-1d\"",
            format!("2:16: key rotation.grace_period: \"-1d\" {not_duration}"),
        ),
        (
            "grace_period = \"40000d\"",
            "2:16: key rotation.grace_period: \"40000d\" is longer than the 100 years iotd \
             accepts"
                .to_owned(),
        ),
        (
            "trust_clock = \"yes\"",
            "2:15: key rotation.trust_clock: invalid type: string \"yes\", expected a boolean"
                .to_owned(),
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            error_of(&format!("[rotation]\n{text}\n")),
            format!("/d/20-site.toml:{expected}"),
            "for {text:?}"
        );
    }
    assert_eq!(
        error_of("rotation = 5\n"),
        "/d/20-site.toml:1:12: key rotation: invalid type: integer `5`, expected a [rotation] table"
    );
    assert_eq!(
        error_of("[[rotation]]\njitter = \"0\"\n"),
        "/d/20-site.toml:1:3: key rotation: invalid type: array, expected a [rotation] table"
    );
}

#[test]
fn a_drop_in_overrides_one_rotation_key_and_keeps_the_others() {
    let s = load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        (
            "/usr/lib/iotd/config.d/10-image.toml",
            "[rotation]\nrenew_before = \"30d\"\nmax_age = \"365d\"\njitter = \"1d\"\n",
        ),
        (
            "/etc/iotd/config.d/20-site.toml",
            "[rotation]\njitter = \"5%\"\n",
        ),
    ])
    .unwrap();
    assert_eq!(s.rotation.renew_before, Span::Duration(days(30)));
    assert_eq!(s.rotation.max_age, Some(days(365)));
    assert_eq!(s.rotation.jitter, Span::Percent(5));
    // "off" undoes an earlier file's age limit.
    let s = load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        ("/d/10-image.toml", "[rotation]\nmax_age = \"365d\"\n"),
        ("/d/20-site.toml", "rotation.max_age = \"off\"\n"),
    ])
    .unwrap();
    assert_eq!(s.rotation.max_age, None);
    // A bad value is refused even though a later file overrides it.
    let error = load_parts(&[
        ("/etc/iotd/config.toml", REQUIRED),
        ("/d/10-image.toml", "[rotation]\nrenew_before = \"20\"\n"),
        ("/d/20-site.toml", "[rotation]\nrenew_before = \"20%\"\n"),
    ])
    .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("/d/10-image.toml:2:16: key rotation.renew_before: \"20\" is neither"),
        "{error}"
    );
}

#[test]
fn an_unknown_rotation_key_suggests_the_nearest() {
    assert_eq!(
        error_of("[rotation]\nrenew_befor = \"20%\"\n"),
        "/d/20-site.toml:2:1: key rotation.renew_befor: unknown key (expected one of: \
         renew_before, max_age, jitter, retry_interval, template, report_topic, grace_period, \
         trust_clock); did you mean renew_before?"
    );
    assert!(error_of("[rotation]\ntrust_clok = true\n").ends_with("did you mean trust_clock?"));
    assert!(error_of("[rotation]\ngrace = \"7d\"\n").ends_with("trust_clock)"));
}

#[test]
fn spans_display_as_the_configuration_writes_them() {
    assert_eq!(Span::Percent(20).to_string(), "20%");
    assert_eq!(Span::Duration(days(30)).to_string(), "30d");
    assert_eq!(
        Span::Duration(Duration::from_secs(36 * 3600 + 61)).to_string(),
        "1d12h1m1s"
    );
    assert_eq!(Span::Duration(Duration::ZERO).to_string(), "0s");
}
