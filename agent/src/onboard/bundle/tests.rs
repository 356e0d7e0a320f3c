#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine as _;
use iotd_testkit::pki::Pki;
use proptest::prelude::*;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use serde_json::{Map, Value as Json, json};

use super::*;
use crate::keys::DeviceKey as _;
use crate::keys::file::FileKey;
use crate::keys::file::testdata::{EC_SEC1_PEM, RSA_PKCS1_PEM, RSA_PKCS8_PEM};
use crate::store::ClaimOrigin;

const ENDPOINT: &str = "abc-ats.iot.eu-west-1.amazonaws.com";
const LAB_ENDPOINT: &str = "lab-ats.iot.eu-central-1.amazonaws.com";
/// AWS's CreateProvisioningClaim `expiration`, as its REST JSON sends it.
const AWS_EXPIRATION: f64 = 1_735_689_600.0;

const CONFIG: &str = "[cloud]\nendpoint = \"abc-ats.iot.eu-west-1.amazonaws.com\"\n\
                      [provisioning]\ntemplate = \"gw-template\"\n\
                      [provisioning.parameters]\nSerialNumber = \"GW-0001\"\n";

fn settings(extra: &str) -> Settings {
    crate::config::load_fragments(&[(
        PathBuf::from("/etc/iotd/config.toml"),
        format!("{CONFIG}{extra}"),
    )])
    .unwrap()
}

/// The configuration's defaults: only the configured template and endpoint, no installer
/// parameters.
fn default_policy() -> BundlePolicy {
    BundlePolicy::from_settings(&settings(""))
}

/// Two templates, two endpoints, Site and Location from the installer.
fn policy() -> BundlePolicy {
    BundlePolicy::from_settings(&settings(
        "[onboarding]\nallowed_templates = [\"gw-template\", \"gw-lab\"]\n\
         allowed_endpoints = [\"abc-ats.iot.eu-west-1.amazonaws.com\", \
         \"lab-ats.iot.eu-central-1.amazonaws.com\"]\n\
         installer_parameters = [\"Site\", \"Location\"]\n",
    ))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A claim certificate and its key, PEM.
struct TestClaim {
    certificate_pem: String,
    key_pem: String,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(Pki::new)
}

/// A certificate from the test CA for the key in `key_pem`, with the CA after it (a chain, as
/// an installer may send).
fn claim_for(key_pem: &str) -> TestClaim {
    let key = FileKey::from_pem(key_pem, Path::new("test key")).unwrap();
    let cert = pki().client_cert(&key.public_key_spki());
    TestClaim {
        certificate_pem: pem("CERTIFICATE", &cert) + &pki().ca_pem(),
        key_pem: key_pem.to_owned(),
    }
}

/// RSA 2048, PKCS#1: what CreateProvisioningClaim hands out. (rcgen on ring cannot generate
/// RSA keys, so this is the openssl-made test key of the file backend's tests.)
fn rsa_claim() -> &'static TestClaim {
    static CLAIM: OnceLock<TestClaim> = OnceLock::new();
    CLAIM.get_or_init(|| claim_for(RSA_PKCS1_PEM))
}

/// A fresh ECDSA P-256 key, PKCS#8.
fn ec_claim() -> &'static TestClaim {
    static CLAIM: OnceLock<TestClaim> = OnceLock::new();
    CLAIM.get_or_init(|| {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .unwrap();
        claim_for(&pem("PRIVATE KEY", pkcs8.as_ref()))
    })
}

/// The fields of a valid bundle for `claim`, AWS-shaped (`not_after` in Unix seconds).
fn fields(claim: &TestClaim) -> Map<String, Json> {
    let Json::Object(map) = json!({
        "v": 1,
        "certificate_pem": claim.certificate_pem,
        "private_key_pem": claim.key_pem,
        "not_after": AWS_EXPIRATION,
    }) else {
        unreachable!()
    };
    map
}

fn with(claim: &TestClaim, extra: Json) -> Vec<u8> {
    let mut map = fields(claim);
    if let Json::Object(extra) = extra {
        map.extend(extra);
    }
    serde_json::to_vec(&map).unwrap()
}

fn without(claim: &TestClaim, field: &str) -> Vec<u8> {
    let mut map = fields(claim);
    map.remove(field);
    serde_json::to_vec(&map).unwrap()
}

/// The base64 lines of every test key: none may appear in a message.
fn secret_lines() -> Vec<&'static str> {
    [
        rsa_claim().key_pem.as_str(),
        ec_claim().key_pem.as_str(),
        EC_SEC1_PEM,
        RSA_PKCS8_PEM,
    ]
    .into_iter()
    .flat_map(str::lines)
    .filter(|l| !l.starts_with("-----") && l.len() >= 16)
    .collect()
}

/// A refusal is one of the profile's codes with its status, and a one-line message that
/// holds no key material.
fn assert_clean(refusal: &BundleRefusal) {
    let (code, status) = (refusal.code(), refusal.http_status());
    assert!(
        matches!(
            (code, status),
            ("malformed", 400) | ("unsupported_version", 400) | ("claim_invalid", 422)
        ),
        "{code} {status}"
    );
    let message = refusal.message();
    assert!(!message.is_empty());
    assert!(!message.contains('\n'), "{message}");
    assert!(!message.contains("-----"), "{message}");
    for line in secret_lines() {
        assert!(!message.contains(line), "key material in {message}");
    }
    assert_eq!(refusal.to_string(), message);
}

fn refused(bundle: &[u8], policy: &BundlePolicy) -> BundleRefusal {
    let refusal = open_bundle(bundle, policy).unwrap_err();
    assert_clean(&refusal);
    refusal
}

/// Refused with `code`, and the message says `says`.
fn assert_refused(bundle: &[u8], policy: &BundlePolicy, code: &str, says: &str) {
    let refusal = refused(bundle, policy);
    assert_eq!(refusal.code(), code, "{refusal:?}");
    assert!(
        refusal.message().contains(says),
        "{:?} does not say {says:?}",
        refusal.message()
    );
}

// ---- accepted bundles -----------------------------------------------------------------------

#[test]
fn an_aws_rsa_2048_claim_is_accepted_with_the_configured_defaults() {
    let claim = rsa_claim();
    let opened = open_bundle(&with(claim, json!({})), &default_policy()).unwrap();
    assert_eq!(opened.template, "gw-template");
    assert_eq!(opened.endpoint, None);
    assert!(opened.parameters.is_empty());
    assert_eq!(opened.not_after, Some(1_735_689_600));
    assert_eq!(opened.claim.origin, ClaimOrigin::Network);
    assert_eq!(opened.claim.description, CLAIM_DESCRIPTION);
    assert_eq!(opened.claim.chain.len(), 2, "the chain is kept");
    let leaf_spki = crate::tls::certificate_spki(&opened.claim.chain[0]).unwrap();
    assert_eq!(leaf_spki, opened.claim.key.public_key_spki());
    // Nothing of the key in its Debug form (for logs).
    let debug = format!("{opened:?}");
    for line in secret_lines() {
        assert!(!debug.contains(line));
    }
}

#[test]
fn an_ec_claim_with_every_setting_is_accepted() {
    let claim = ec_claim();
    let bundle = with(
        claim,
        json!({
            "not_after": "2026-01-01T00:05:00Z",
            "template": "gw-lab",
            "endpoint": LAB_ENDPOINT,
            "parameters": {"Site": "Hamburg-3", "Location": "Hall 2, rack 4"},
        }),
    );
    let opened = open_bundle(&bundle, &policy()).unwrap();
    assert_eq!(opened.template, "gw-lab");
    assert_eq!(opened.endpoint.as_deref(), Some(LAB_ENDPOINT));
    assert_eq!(
        opened.parameters,
        BTreeMap::from([
            ("Location".to_owned(), "Hall 2, rack 4".to_owned()),
            ("Site".to_owned(), "Hamburg-3".to_owned()),
        ])
    );
    assert_eq!(opened.not_after, Some(1_767_225_900));
    assert!(opened.claim.key.sign_ecdsa_p256_sha256(b"csr").is_ok());
}

#[test]
fn every_key_encoding_is_accepted() {
    for key in [EC_SEC1_PEM, RSA_PKCS8_PEM, RSA_PKCS1_PEM] {
        let claim = claim_for(key);
        open_bundle(&with(&claim, json!({})), &default_policy()).unwrap();
    }
}

#[test]
fn not_after_is_seconds_or_rfc_3339_or_null_and_never_checked_against_the_clock() {
    let claim = ec_claim();
    for (value, expected) in [
        (json!(1_735_689_600), Some(1_735_689_600)),
        (json!(1_735_689_600.75), Some(1_735_689_600)),
        (json!("2026-01-01T01:05:00+01:00"), Some(1_767_225_900)),
        (json!("2026-01-01T00:05:00.5Z"), Some(1_767_225_900)),
        // Long past: a network claim is used at once, whatever the gateway's clock says.
        (json!("2000-01-01T00:00:00Z"), Some(946_684_800)),
        (json!(0), Some(0)),
        (json!(null), None),
    ] {
        let bundle = with(claim, json!({ "not_after": value }));
        let opened = open_bundle(&bundle, &default_policy()).unwrap();
        assert_eq!(opened.not_after, expected, "{value}");
    }
    for value in [
        json!("tomorrow"),
        json!("2026-01-01"),
        json!(-5),
        json!(1e20),
        json!(true),
        json!([]),
    ] {
        let bundle = with(claim, json!({ "not_after": value }));
        assert_refused(&bundle, &default_policy(), "malformed", "not_after");
    }
    assert_refused(
        &without(claim, "not_after"),
        &default_policy(),
        "malformed",
        "the field not_after is missing",
    );
}

#[test]
fn the_configured_template_and_endpoint_may_be_named_and_null_is_left_out() {
    let claim = ec_claim();
    // Naming the configured template gives what leaving it out gives, whatever the list says.
    let only_lab = BundlePolicy {
        allowed_templates: vec!["gw-lab".to_owned()],
        allowed_endpoints: vec![LAB_ENDPOINT.to_owned()],
        ..policy()
    };
    let opened = open_bundle(
        &with(
            claim,
            json!({"template": "gw-template", "endpoint": "ABC-ats.iot.eu-west-1.amazonaws.com."}),
        ),
        &only_lab,
    )
    .unwrap();
    assert_eq!(opened.template, "gw-template");
    assert_eq!(opened.endpoint.as_deref(), Some(ENDPOINT));
    let opened = open_bundle(
        &with(
            claim,
            json!({"template": null, "endpoint": null, "parameters": null}),
        ),
        &policy(),
    )
    .unwrap();
    assert_eq!(opened.template, "gw-template");
    assert_eq!(opened.endpoint, None);
    assert!(opened.parameters.is_empty());
}

#[test]
fn version_one_may_be_written_as_a_float() {
    let bundle = with(ec_claim(), json!({"v": 1.0}));
    open_bundle(&bundle, &default_policy()).unwrap();
}

#[test]
fn the_policy_comes_from_the_settings() {
    let p = policy();
    assert_eq!(p.template, "gw-template");
    assert_eq!(p.endpoint, ENDPOINT);
    assert_eq!(p.allowed_templates, ["gw-template", "gw-lab"]);
    assert_eq!(p.allowed_endpoints, [ENDPOINT, LAB_ENDPOINT]);
    assert_eq!(
        p.installer_parameters,
        BTreeSet::from(["Location".to_owned(), "Site".to_owned()])
    );
    assert_eq!(
        p.device_parameters,
        BTreeSet::from(["SerialNumber".to_owned()])
    );
    let d = default_policy();
    assert_eq!(d.allowed_templates, ["gw-template"]);
    assert_eq!(d.allowed_endpoints, [ENDPOINT]);
    assert!(d.installer_parameters.is_empty());
}

// ---- refusals -------------------------------------------------------------------------------

#[test]
fn a_bundle_over_12_kib_is_refused_before_it_is_read() {
    let claim = rsa_claim();
    let mut bundle = with(claim, json!({}));
    bundle.resize(MAX_BUNDLE_LEN, b' ');
    open_bundle(&bundle, &default_policy()).unwrap();

    bundle.resize(13_000, b' ');
    let refusal = refused(&bundle, &default_policy());
    assert_eq!(refusal, BundleRefusal::TooLarge { len: 13_000 });
    assert_eq!(
        (refusal.code(), refusal.http_status()),
        ("claim_invalid", 422)
    );
    assert!(
        refusal
            .message()
            .starts_with("the claim bundle is 13 000 bytes, more than 12 288;"),
        "{}",
        refusal.message()
    );
    // Not JSON at all, but too large first.
    assert_eq!(
        refused(&[0xff; MAX_BUNDLE_LEN + 1], &default_policy()).code(),
        "claim_invalid"
    );
}

#[test]
fn what_is_not_a_json_object_is_malformed() {
    let policy = default_policy();
    for (bundle, says) in [
        (&b""[..], "not complete JSON"),
        (b"   ", "not complete JSON"),
        (b"{\"v\":1,", "not complete JSON"),
        (b"v=1", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[1]", "must be a JSON object, not an array"),
        (
            b"\"-----BEGIN PRIVATE KEY-----\"",
            "must be a JSON object, not a string",
        ),
        (b"5", "must be a JSON object, not a number"),
        (b"null", "must be a JSON object, not null"),
        (b"{\"v\":1}{}", "not JSON (trailing characters"),
        (b"{\"v\":1,\"certificate_pem\":\"\\ud800\"}", "not JSON"),
    ] {
        let refusal = refused(bundle, &policy);
        assert_eq!(refusal.code(), "malformed", "{bundle:?}");
        assert_eq!(refusal.http_status(), 400);
        assert!(
            refusal.message().contains(says),
            "{bundle:?}: {}",
            refusal.message()
        );
    }
    // Deep nesting: skipped without recursion, or refused at the first level; no stack
    // overflow at the size limit.
    for field in ["x", "parameters", "v"] {
        let deep = format!("{}{}", "[".repeat(6_000), "]".repeat(6_000));
        let bundle = format!("{{\"{field}\":{deep}}}");
        assert_eq!(refused(bundle.as_bytes(), &policy).code(), "malformed");
    }
}

#[test]
fn v_must_be_1() {
    let claim = ec_claim();
    let policy = default_policy();
    assert_refused(
        &without(claim, "v"),
        &policy,
        "malformed",
        "the field v is missing",
    );
    for (v, code, says) in [
        (json!(2), "unsupported_version", "has version 2, but"),
        (json!(0), "unsupported_version", "has version 0,"),
        (json!(-1), "unsupported_version", "has version -1,"),
        (json!(2.0), "unsupported_version", "has version 2,"),
        (
            json!(1e300),
            "unsupported_version",
            "has version 10000000000000000000…,",
        ),
        (
            json!(1.5),
            "malformed",
            "the field v must be a whole number",
        ),
        (
            json!("1"),
            "malformed",
            "v must be the number 1, not a string",
        ),
        (json!(null), "malformed", "v must be the number 1, not null"),
        (json!(true), "malformed", "not true or false"),
        (json!({}), "malformed", "not an object"),
    ] {
        let bundle = with(claim, json!({ "v": v }));
        assert_refused(&bundle, &policy, code, says);
    }
    // A newer version with fields this one does not know: the version is what matters.
    let bundle = with(claim, json!({"v": 2, "wifi": {"ssid": "x"}}));
    assert_refused(&bundle, &policy, "unsupported_version", "version 2");
    let bundle = br#"{"future": [1, {"a": "b"}], "v": 3}"#;
    assert_refused(bundle, &policy, "unsupported_version", "version 3");
}

#[test]
fn unknown_repeated_missing_and_mistyped_fields_are_malformed() {
    let claim = ec_claim();
    let policy = policy();
    assert_refused(
        &with(claim, json!({"paramters": {"Site": "x"}})),
        &policy,
        "malformed",
        "it has a field paramters, which a version 1 bundle does not have",
    );
    // An unknown name that is not a plausible one is not echoed.
    let long = "k".repeat(300);
    let refusal = refused(&with(claim, json!({ long.clone(): 1 })), &policy);
    assert!(!refusal.message().contains(&long));
    assert!(refusal.message().contains("a text of 300 characters"));

    let text = String::from_utf8(with(claim, json!({}))).unwrap();
    let twice = text.replacen("{", "{\"template\":\"gw-lab\",\"template\":\"gw-lab\",", 1);
    assert_refused(
        twice.as_bytes(),
        &policy,
        "malformed",
        "the field template is given twice",
    );
    for field in ["certificate_pem", "private_key_pem"] {
        assert_refused(
            &without(claim, field),
            &policy,
            "malformed",
            &format!("the field {field} is missing"),
        );
        assert_refused(
            &with(claim, json!({ field: 5 })),
            &policy,
            "malformed",
            &format!("the field {field} must be a string, not a number"),
        );
        assert_refused(
            &with(claim, json!({ field: null })),
            &policy,
            "malformed",
            "not null",
        );
    }
    for (extra, says) in [
        (
            json!({"template": 5}),
            "the field template must be a string",
        ),
        (
            json!({"endpoint": ["x"]}),
            "the field endpoint must be a string",
        ),
        (
            json!({"parameters": ["Site"]}),
            "the field parameters must be an object of strings",
        ),
        (
            json!({"parameters": {"Site": 5}}),
            "the field parameters.Site must be a string, not a number",
        ),
        (
            json!({"parameters": {"Site": null}}),
            "the field parameters.Site must be a string, not null",
        ),
    ] {
        assert_refused(&with(claim, extra), &policy, "malformed", says);
    }
    let text = String::from_utf8(with(claim, json!({}))).unwrap();
    let twice = text.replacen("{", "{\"parameters\":{\"Site\":\"a\",\"Site\":\"b\"},", 1);
    assert_refused(
        twice.as_bytes(),
        &policy,
        "malformed",
        "the template parameter Site is given twice",
    );
}

#[test]
fn a_certificate_or_key_that_does_not_parse_is_refused_naming_which() {
    let claim = ec_claim();
    let policy = default_policy();
    let cert_not_pem = with(claim, json!({"certificate_pem": "hello"}));
    assert_refused(
        &cert_not_pem,
        &policy,
        "claim_invalid",
        "the claim certificate cannot be used: no certificates in it",
    );
    let cert_garbage = with(
        claim,
        json!({"certificate_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}),
    );
    assert_refused(
        &cert_garbage,
        &policy,
        "claim_invalid",
        "the claim certificate cannot be used: certificate 1 is not valid X.509",
    );
    let cert_is_a_key = with(claim, json!({"certificate_pem": claim.key_pem}));
    assert_refused(
        &cert_is_a_key,
        &policy,
        "claim_invalid",
        "no certificates in it",
    );

    for (key, says) in [
        (
            "hello".to_owned(),
            "the private key cannot be used: it holds no PEM private key",
        ),
        (
            claim.certificate_pem.clone(),
            "it holds a certificate, not a private key",
        ),
        (
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
                .to_owned(),
            "it is encrypted",
        ),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n".to_owned(),
            "it is not a well-formed RSA or ECDSA private key",
        ),
        (
            "-----BEGIN PRIVATE KEY-----\n!!!!\n-----END PRIVATE KEY-----\n".to_owned(),
            "it is not a well-formed RSA or ECDSA private key",
        ),
    ] {
        let bundle = with(claim, json!({ "private_key_pem": key }));
        assert_refused(&bundle, &policy, "claim_invalid", says);
    }
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused() {
    for (certificate, key) in [
        (rsa_claim(), ec_claim()),
        (ec_claim(), rsa_claim()),
        (ec_claim(), &claim_for(EC_SEC1_PEM)),
    ] {
        let bundle = with(certificate, json!({"private_key_pem": key.key_pem}));
        let refusal = refused(&bundle, &default_policy());
        assert_eq!(refusal, BundleRefusal::KeyMismatch);
        assert_eq!(refusal.http_status(), 422);
        assert!(
            refusal
                .message()
                .starts_with("the private key does not match the claim certificate;")
        );
    }
}

#[test]
fn a_template_not_allowed_is_refused() {
    let claim = ec_claim();
    let refusal = refused(&with(claim, json!({"template": "gw-x"})), &default_policy());
    assert_eq!(refusal.code(), "claim_invalid");
    assert_eq!(
        refusal.message(),
        "the claim's template gw-x is not allowed on this gateway (allowed: gw-template); \
         request a claim for gw-template"
    );
    assert_refused(
        &with(claim, json!({"template": "GW-LAB"})),
        &policy(),
        "claim_invalid",
        "(allowed: gw-template, gw-lab); request a claim for one of them",
    );
    // A key pasted into the wrong field is not echoed.
    let refusal = refused(&with(claim, json!({"template": claim.key_pem})), &policy());
    assert!(refusal.message().contains("template (a text of"));
}

#[test]
fn an_endpoint_not_allowed_is_refused() {
    let claim = ec_claim();
    assert_refused(
        &with(claim, json!({"endpoint": LAB_ENDPOINT})),
        &default_policy(),
        "claim_invalid",
        "the claim's endpoint lab-ats.iot.eu-central-1.amazonaws.com is not allowed on this \
         gateway (allowed: abc-ats.iot.eu-west-1.amazonaws.com); leave the endpoint out",
    );
    assert_refused(
        &with(
            claim,
            json!({"endpoint": "evil-ats.iot.us-east-1.amazonaws.com"}),
        ),
        &policy(),
        "claim_invalid",
        "(allowed: abc-ats.iot.eu-west-1.amazonaws.com, lab-ats.iot.eu-central-1.amazonaws.com)",
    );
}

#[test]
fn parameters_are_only_the_allowed_ones_and_never_the_gateways() {
    let claim = ec_claim();
    assert_refused(
        &with(claim, json!({"parameters": {"Owner": "x"}})),
        &policy(),
        "claim_invalid",
        "the template parameter Owner cannot be set by the installer on this gateway \
         (allowed: Location, Site); leave it out",
    );
    assert_refused(
        &with(claim, json!({"parameters": {"Site": "x"}})),
        &default_policy(),
        "claim_invalid",
        "this gateway takes no parameters from the installer",
    );
    assert_refused(
        &with(claim, json!({"parameters": {"SerialNumber": "FAKE-1"}})),
        &policy(),
        "claim_invalid",
        "the template parameter SerialNumber comes from the gateway itself and cannot be set \
         by the installer",
    );
    // Even when the configuration also lists it for the installer.
    let both = BundlePolicy {
        installer_parameters: BTreeSet::from(["Site".to_owned(), "SerialNumber".to_owned()]),
        ..policy()
    };
    let refusal = refused(
        &with(claim, json!({"parameters": {"SerialNumber": "FAKE-1"}})),
        &both,
    );
    assert_eq!(
        refusal,
        BundleRefusal::ParameterFromDevice {
            name: "SerialNumber".to_owned()
        }
    );
    let refusal = refused(&with(claim, json!({"parameters": {"Owner": "x"}})), &both);
    assert!(refusal.message().contains("(allowed: Site)"), "{refusal}");

    let max = "v".repeat(MAX_PARAMETER_VALUE_LEN);
    let opened = open_bundle(
        &with(claim, json!({"parameters": {"Site": max}})),
        &policy(),
    )
    .unwrap();
    assert_eq!(opened.parameters["Site"].len(), 1024);
    for (value, says) in [
        (String::new(), "is empty; give a value of 1 to 1 024 bytes"),
        ("v".repeat(1025), "is 1 025 bytes, more than 1 024"),
        ("a\nb".to_owned(), "contains control characters"),
    ] {
        assert_refused(
            &with(claim, json!({"parameters": {"Site": value}})),
            &policy(),
            "claim_invalid",
            &format!("the value of template parameter Site {says}"),
        );
    }
}

#[test]
fn the_profile_vectors_claim_plaintext_is_read_up_to_its_placeholder_pem() {
    // The draft vectors' claim plaintexts: the JSON is a valid bundle (RFC 3339 not_after,
    // template iotd-fleet), the PEM a placeholder that is refused as such.
    const DRAFT: &str =
        include_str!("../../../tests/fixtures/onboarding/iotd-onboard-v1-draft.json");
    let draft: Json = serde_json::from_str(DRAFT).unwrap();
    let mut plaintexts = Vec::new();
    let mut stack = vec![&draft];
    while let Some(node) = stack.pop() {
        match node {
            Json::Object(map) => {
                if let Some(Json::Object(claim)) = map.get("claim")
                    && let Some(Json::String(text)) = claim.get("plaintext_utf8")
                {
                    plaintexts.push(text.clone());
                }
                stack.extend(map.values());
            }
            Json::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    assert!(!plaintexts.is_empty());
    let policy = BundlePolicy {
        template: "iotd-fleet".to_owned(),
        ..default_policy()
    };
    for plaintext in plaintexts {
        assert_refused(
            plaintext.as_bytes(),
            &policy,
            "claim_invalid",
            "the claim certificate cannot be used",
        );
        // With a real claim in place of the placeholders, the same bundle is accepted.
        let mut bundle: Map<String, Json> = serde_json::from_str(&plaintext).unwrap();
        bundle.insert(
            "certificate_pem".into(),
            ec_claim().certificate_pem.clone().into(),
        );
        bundle.insert("private_key_pem".into(), ec_claim().key_pem.clone().into());
        let opened = open_bundle(&serde_json::to_vec(&bundle).unwrap(), &policy).unwrap();
        assert_eq!(opened.template, "iotd-fleet");
        assert_eq!(opened.not_after, Some(1_767_225_900));
    }
}

#[test]
fn helpers() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(12_288), "12 288");
    assert_eq!(thousands(1_234_567), "1 234 567");
    assert_eq!(
        redact_quoted(r#"invalid type: string "a\"b", expected x "y"#),
        r#"invalid type: string "…", expected x "…""#
    );
    assert_eq!(shown("Site", 64), "Site");
    assert_eq!(shown("", 64), "(a text of 0 characters)");
    assert_eq!(shown("a b", 64), "(a text of 3 characters)");
    assert!(same_host("A.example.", "a.EXAMPLE"));
}

// ---- properties -----------------------------------------------------------------------------

/// 2 000 cases unless PROPTEST_CASES says otherwise (the bench runs 100 000).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2_000)
}

/// Opens `bundle` twice: the same answer both times, and a refusal is clean.
fn check_any(bundle: &[u8], policy: &BundlePolicy) -> Result<Option<&'static str>, TestCaseError> {
    let first = open_bundle(bundle, policy);
    let second = open_bundle(bundle, policy);
    match (&first, &second) {
        (Err(a), Err(b)) => {
            prop_assert_eq!(a, b);
            assert_clean(a);
            Ok(Some(a.code()))
        }
        (Ok(a), Ok(b)) => {
            prop_assert_eq!(&a.template, &b.template);
            prop_assert_eq!(&a.parameters, &b.parameters);
            let leaf = crate::tls::certificate_spki(&a.claim.chain[0]).unwrap();
            prop_assert_eq!(leaf, a.claim.key.public_key_spki());
            prop_assert!(policy.templates().contains(&a.template.as_str()));
            Ok(None)
        }
        _ => Err(TestCaseError::fail("two answers for one bundle")),
    }
}

fn valid_bundle(rsa: bool) -> Vec<u8> {
    let claim = if rsa { rsa_claim() } else { ec_claim() };
    with(
        claim,
        json!({"template": "gw-lab", "parameters": {"Site": "Hamburg-3"}}),
    )
}

fn any_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Json::from),
        "\\PC{0,24}".prop_map(Json::String),
        Just(Json::String(ec_claim().key_pem.clone())),
        Just(Json::String("gw-template".to_owned())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::btree_map("[a-zA-Z_]{0,8}", inner, 0..4)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Any bytes: a clean refusal (or, vanishingly unlikely, a claim), never a panic.
    #[test]
    fn any_bytes_are_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..14_000)) {
        let code = check_any(&bytes, &policy())?;
        if bytes.len() > MAX_BUNDLE_LEN {
            prop_assert_eq!(code, Some("claim_invalid"));
        }
    }

    /// JSON-looking text, most of it an object that starts like a bundle.
    #[test]
    fn json_like_text_is_refused_cleanly(
        prefix in prop_oneof![Just(""), Just("{"), Just("{\"v\":1,"), Just("{\"v\":2,")],
        text in "[{}\\[\\]\",:0-9a-z_ .\\\\eE+-]{0,300}",
    ) {
        check_any(format!("{prefix}{text}").as_bytes(), &policy())?;
    }

    /// A valid bundle with bytes flipped, removed, inserted or cut off.
    #[test]
    fn mutated_bundles_are_opened_or_refused_cleanly(
        rsa in any::<bool>(),
        edits in prop::collection::vec((0..4u8, any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bundle = valid_bundle(rsa);
        for (kind, at, byte) in edits {
            if bundle.is_empty() {
                break;
            }
            let i = at.index(bundle.len());
            match kind {
                0 => bundle[i] ^= 1 << (byte % 8),
                1 => { bundle.remove(i); }
                2 => bundle.insert(i, byte),
                _ => bundle.truncate(i),
            }
        }
        check_any(&bundle, &policy())?;
    }

    /// A valid bundle with one field replaced by (or one field added with) any JSON value.
    #[test]
    fn bundles_with_any_field_value_are_opened_or_refused_cleanly(
        rsa in any::<bool>(),
        field in prop_oneof![
            Just("v"), Just("certificate_pem"), Just("private_key_pem"), Just("not_after"),
            Just("template"), Just("endpoint"), Just("parameters"), Just("other"),
        ],
        value in any_json(),
    ) {
        let claim = if rsa { rsa_claim() } else { ec_claim() };
        let bundle = with(claim, json!({ field: value.clone() }));
        let code = check_any(&bundle, &policy())?;
        match (field, &value) {
            ("other", _) => prop_assert_eq!(code, Some("malformed")),
            ("certificate_pem" | "private_key_pem", v) if !v.is_string() => {
                prop_assert_eq!(code, Some("malformed"));
            }
            ("v", Json::Number(n)) if n.as_i64() == Some(1) => prop_assert_eq!(code, None),
            ("v", Json::Number(n)) if n.as_i64().is_some() => {
                prop_assert_eq!(code, Some("unsupported_version"));
            }
            ("v", Json::Number(_)) => {}
            ("v", _) => prop_assert_eq!(code, Some("malformed")),
            _ => {}
        }
    }
}
