//! The template engine through the real binary: a table of templates x inputs x expected
//! things, attributes, certificate status and device configuration; re-provisioning an
//! existing thing under each OverrideSettings; and templates refused at start-up.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::{Value, json};

fn cert_resource(status: &str) -> Value {
    json!({"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": status}})
}

fn open_policy() -> Value {
    json!({"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]
    }}})
}

struct Case {
    name: &'static str,
    template: Value,
    params: Vec<(&'static str, &'static str)>,
    thing: &'static str,
    attributes: Value,
    status: &'static str,
    config: Value,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "join",
            template: json!({
                "Parameters": {"Serial": {"Type": "String"}, "Site": {"Type": "String", "Default": "lab"}},
                "Resources": {
                    "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                        "ThingName": {"Fn::Join": ["-", ["gw", {"Ref": "Serial"}]]},
                        "AttributePayload": {"site": {"Ref": "Site"}, "serial": {"Ref": "Serial"}}}},
                    "certificate": cert_resource("ACTIVE"),
                    "policy": open_policy()
                }
            }),
            params: vec![("Serial", "1")],
            thing: "gw-1",
            attributes: json!({"serial": "1", "site": "lab"}),
            status: "ACTIVE",
            config: json!({}),
        },
        Case {
            name: "sub_and_map",
            template: json!({
                "Parameters": {"Serial": {"Type": "String"}, "Region": {"Type": "String", "Default": "eu"}},
                "Mappings": {"Endpoints": {"eu": {"Ota": "https://ota.eu.example"}, "us": {"Ota": "https://ota.us.example"}}},
                "Resources": {
                    "thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::Sub": "dev-${Serial}-${Region}"}}},
                    "certificate": cert_resource("Active"),
                    "policy": open_policy()
                },
                "DeviceConfiguration": {"OtaUrl": {"Fn::FindInMap": ["Endpoints", {"Ref": "Region"}, "Ota"]}, "Certificate": {"Ref": "AWS::IoT::Certificate::Id"}}
            }),
            params: vec![("Serial", "2"), ("Region", "us")],
            thing: "dev-2-us",
            attributes: json!({}),
            status: "ACTIVE",
            config: json!({"OtaUrl": "https://ota.us.example", "Certificate": "<cert>"}),
        },
        Case {
            name: "select_split",
            template: json!({
                "Parameters": {"Path": {"Type": "String"}},
                "Resources": {
                    "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                        "ThingName": {"Fn::Select": [2, {"Fn::Split": ["/", {"Ref": "Path"}]}]},
                        "AttributePayload": {"plant": {"Fn::Select": ["0", {"Fn::Split": ["/", {"Ref": "Path"}]}]}}}},
                    "certificate": cert_resource("INACTIVE"),
                    "policy": open_policy()
                }
            }),
            params: vec![("Path", "berlin/line4/press-7")],
            thing: "press-7",
            attributes: json!({"plant": "berlin"}),
            status: "INACTIVE",
            config: json!({}),
        },
    ]
}

#[tokio::test]
async fn templates_by_inputs_give_expected_things_and_configuration() {
    let cases = cases();
    let templates: Vec<(&str, Value)> =
        cases.iter().map(|c| (c.name, c.template.clone())).collect();
    let claims: Vec<String> = cases.iter().map(|c| format!("{0}={0}", c.name)).collect();
    let mut args = vec!["--no-connect-throttle"];
    for c in &claims {
        args.extend(["--claim", c.as_str()]);
    }
    let fake = Fake::start(&templates, &args).await;
    for case in &cases {
        let params: BTreeMap<&str, &str> = case.params.iter().copied().collect();
        let device = provision_csr(
            &fake,
            &fake.claim(case.name),
            case.name,
            &params,
            &format!("claim-{}", case.name),
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(device.thing_name, case.thing, "{}", case.name);
        let want_config = serde_json::to_string(&case.config)
            .unwrap()
            .replace("<cert>", &device.certificate_id);
        assert_eq!(
            device.device_configuration,
            serde_json::from_str::<Value>(&want_config).unwrap(),
            "{}",
            case.name
        );
        let reg = fake.registry().await;
        assert_eq!(
            reg["things"][case.thing]["attributes"], case.attributes,
            "{}",
            case.name
        );
        assert_eq!(
            reg["certificates"][&device.certificate_id]["status"], case.status,
            "{}",
            case.name
        );
    }
}

fn override_template(attr: &str) -> Value {
    json!({
        "Parameters": {"Serial": {"Type": "String"}, "Batch": {"Type": "String"}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing",
                "Properties": {"ThingName": {"Ref": "Serial"}, "AttributePayload": {"batch": {"Ref": "Batch"}}},
                "OverrideSettings": {"AttributePayload": attr}},
            "certificate": cert_resource("ACTIVE"),
            "policy": open_policy()
        }
    })
}

#[tokio::test]
async fn reprovisioning_an_existing_thing_attaches_the_new_certificate_per_override_settings() {
    let fake = Fake::start(
        &[
            ("merge", override_template("MERGE")),
            ("replace", override_template("REPLACE")),
            ("keep", override_template("DO_NOTHING")),
            ("fail", override_template("FAIL")),
        ],
        &[
            "--no-connect-throttle",
            "--claim",
            "merge=merge",
            "--claim",
            "replace=replace",
            "--claim",
            "keep=keep",
            "--claim",
            "fail=fail",
        ],
    )
    .await;
    let p = |serial: &'static str, batch: &'static str| {
        BTreeMap::from([("Serial", serial), ("Batch", batch)])
    };
    // (template, second batch value, attributes after the second run, accepted)
    let table = [
        ("merge", "b2", json!({"batch": "b2"}), true),
        ("replace", "b2", json!({"batch": "b2"}), true),
        ("keep", "b2", json!({"batch": "b1"}), true),
        ("fail", "b2", json!({"batch": "b1"}), false),
    ];
    for (template, second, attrs, accepted) in table {
        let serial: &'static str = Box::leak(format!("t-{template}").into_boxed_str());
        let claim = fake.claim(template);
        let first = provision_csr(
            &fake,
            &claim,
            template,
            &p(serial, "b1"),
            &format!("{template}-1"),
        )
        .await
        .unwrap();
        let again = provision_csr(
            &fake,
            &claim,
            template,
            &p(serial, second),
            &format!("{template}-2"),
        )
        .await;
        let reg = fake.registry().await;
        let thing = &reg["things"][serial];
        assert_eq!(thing["attributes"], attrs, "{template}");
        match again {
            Ok(d) => {
                assert!(accepted, "{template} should have been refused");
                // Rotation by re-provisioning: both certificates are attached; AWS detaches nothing itself.
                let principals: Vec<&str> = thing["principals"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect();
                assert!(
                    principals.contains(&first.certificate_id.as_str())
                        && principals.contains(&d.certificate_id.as_str()),
                    "{template}: {principals:?}"
                );
            }
            Err(rejected) => {
                assert!(!accepted, "{template}: {rejected}");
                assert_eq!(rejected["statusCode"], 409, "{template}");
                assert_eq!(rejected["errorCode"], "ResourceConflict");
            }
        }
    }
}

#[tokio::test]
async fn evaluation_errors_are_rejected_with_the_cause() {
    let template = json!({
        "Parameters": {"Serial": {"Type": "String"}, "Parts": {"Type": "String", "Default": "a,b"}},
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Ref": "Serial"},
                "AttributePayload": {"third": {"Fn::Select": ["2", {"Fn::Split": [",", {"Ref": "Parts"}]}]}},
                "ThingGroups": ["no-such-group"]}},
            "certificate": cert_resource("ACTIVE")
        }
    });
    let fake = Fake::start(
        &[("t", template)],
        &["--no-connect-throttle", "--claim", "c=t"],
    )
    .await;
    let claim = fake.claim("c");
    let missing = provision_csr(&fake, &claim, "t", &BTreeMap::new(), "c-1")
        .await
        .unwrap_err();
    assert_eq!(missing["statusCode"], 400);
    assert!(
        missing["errorMessage"].as_str().unwrap().contains("Serial"),
        "{missing}"
    );
    let range = provision_csr(
        &fake,
        &claim,
        "t",
        &BTreeMap::from([("Serial", "s1")]),
        "c-2",
    )
    .await
    .unwrap_err();
    assert!(
        range["errorMessage"]
            .as_str()
            .unwrap()
            .contains("Fn::Select"),
        "{range}"
    );
    let group = provision_csr(
        &fake,
        &claim,
        "t",
        &BTreeMap::from([("Serial", "s1"), ("Parts", "a,b,c")]),
        "c-3",
    )
    .await
    .unwrap_err();
    assert!(
        group["errorMessage"]
            .as_str()
            .unwrap()
            .contains("Thing group no-such-group not found"),
        "{group}"
    );
    // Nothing was created by the refused requests.
    assert_eq!(fake.registry().await["things"], json!({}));
}

#[tokio::test]
async fn refused_templates_stop_start_up_with_the_path_named() {
    let table = [
        (json!({"Resources": {}, "Conditions": {}}), "Conditions"),
        (
            json!({"Resources": {"t": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Fn::If": ["c", "a", "b"]}}}}}),
            "Resources.t.Properties.ThingName",
        ),
        (
            json!({"Resources": {"t": {"Type": "AWS::S3::Bucket", "Properties": {}}}}),
            "Resources.t",
        ),
        (
            json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificatePem": "x"}}}}),
            "Resources.c.Properties",
        ),
    ];
    for (body, path) in table {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.json");
        std::fs::write(&file, body.to_string()).unwrap();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fake-iot-core"))
            .arg("--state-dir")
            .arg(dir.path().join("s"))
            .arg("--template")
            .arg(format!("bad={}", file.display()))
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{body}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
        assert!(
            stderr.contains("template bad") && stderr.contains(path),
            "{stderr} should name {path}"
        );
        assert!(out.stdout.is_empty());
    }
}
