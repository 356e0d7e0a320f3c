//! AWS IoT's REST control plane against the real binary: paths, status codes, the
//! `x-amzn-ErrorType` header on errors and the response shapes botocore parses; plus the
//! effects the control plane has on the device side (temporary claims that can provision,
//! connections closed when a certificate is deactivated, job notifications); and the fake's
//! clock, which tests move through `/_fake/clock`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use fake_iot_core::clock::MAX_TIME;
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::123456789012:role/provisioning";

fn arn(resource: &str) -> String {
    format!("arn:aws:iot:us-east-1:123456789012:{resource}")
}

/// Percent-encodes a URI path parameter as botocore does (nothing is kept but unreserved).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn simple_template() -> Value {
    json!({
        "Parameters": {"SerialNumber": {"Type": "String"}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": {"Ref": "SerialNumber"}}}}
    })
}

async fn now(fake: &Fake) -> i64 {
    fake.http("GET", "/_fake/clock", None).await.2["now"]
        .as_i64()
        .unwrap()
}

/// Asserts an AWS error: status, error type header and a message naming `mentions`.
fn assert_error(answer: (u16, Option<String>, Value), status: u16, kind: &str, mentions: &str) {
    let (s, k, body) = answer;
    assert_eq!((s, k.as_deref()), (status, Some(kind)), "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "message {message:?} should mention {mentions:?}"
    );
}

#[tokio::test]
async fn provisioning_templates_create_describe_update_and_version() {
    let fake = Fake::start(&[], &[]).await;
    let body = simple_template().to_string();
    let create = |name: &str, body: &str| json!({"templateName": name, "templateBody": body, "provisioningRoleArn": ROLE});

    let (status, kind, created) = fake
        .http(
            "POST",
            "/provisioning-templates",
            Some(create("gw-template", &body)),
        )
        .await;
    assert_eq!((status, kind), (200, None), "{created}");
    assert_eq!(
        created,
        json!({"templateArn": arn("provisioningtemplate/gw-template"), "templateName": "gw-template", "defaultVersionId": 1})
    );
    assert_error(
        fake.http(
            "POST",
            "/provisioning-templates",
            Some(create("gw-template", &body)),
        )
        .await,
        409,
        "ResourceAlreadyExistsException",
        "gw-template",
    );
    assert_error(
        fake.http(
            "POST",
            "/provisioning-templates",
            Some(create("bad name", &body)),
        )
        .await,
        400,
        "InvalidRequestException",
        "bad name",
    );
    // A refused body names the path of the problem.
    assert_error(
        fake.http(
            "POST",
            "/provisioning-templates",
            Some(create("t2", r#"{"Resources": []}"#)),
        )
        .await,
        400,
        "InvalidRequestException",
        "Resources",
    );
    assert_error(
        fake.http(
            "POST",
            "/provisioning-templates",
            Some(json!({"templateName": "t3", "templateBody": body})),
        )
        .await,
        400,
        "InvalidRequestException",
        "provisioningRoleArn",
    );

    let (status, _, described) = fake
        .http("GET", "/provisioning-templates/gw-template", None)
        .await;
    assert_eq!(status, 200);
    // AWS creates templates disabled unless `enabled` is given.
    assert_eq!(described["enabled"], false);
    assert_eq!(described["templateBody"], body);
    assert_eq!(described["provisioningRoleArn"], ROLE);
    assert_eq!(described["type"], "FLEET_PROVISIONING");
    assert_eq!(described["defaultVersionId"], 1);
    assert!(described["creationDate"].is_i64() && described["lastModifiedDate"].is_i64());
    assert!(
        described.get("preProvisioningHook").is_none(),
        "absent members are omitted: {described}"
    );
    assert_error(
        fake.http("GET", "/provisioning-templates/gw-missing", None)
            .await,
        404,
        "ResourceNotFoundException",
        "Template gw-missing not found",
    );

    let hook = json!({"targetArn": "http://127.0.0.1:9/hook"});
    let (status, _, _) = fake
        .http(
            "PATCH",
            "/provisioning-templates/gw-template",
            Some(json!({"enabled": true, "preProvisioningHook": hook})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, _, described) = fake
        .http("GET", "/provisioning-templates/gw-template", None)
        .await;
    assert_eq!(described["enabled"], true);
    assert_eq!(
        described["preProvisioningHook"],
        json!({"targetArn": "http://127.0.0.1:9/hook", "payloadVersion": "2020-04-01"})
    );
    assert_error(
        fake.http(
            "PATCH",
            "/provisioning-templates/gw-template",
            Some(json!({"preProvisioningHook": {"targetArn": "arn:aws:lambda:us-east-1:123456789012:function:f"}})),
        )
        .await,
        400,
        "InvalidRequestException",
        "http://",
    );
    fake.http(
        "PATCH",
        "/provisioning-templates/gw-template",
        Some(json!({"removePreProvisioningHook": true})),
    )
    .await;
    let (_, _, described) = fake
        .http("GET", "/provisioning-templates/gw-template", None)
        .await;
    assert!(
        described.get("preProvisioningHook").is_none(),
        "{described}"
    );

    // Versions: a non-default one, then a default one; the default body is what is described.
    let v2 = json!({"Resources": {}}).to_string();
    let (status, _, created) = fake
        .http(
            "POST",
            "/provisioning-templates/gw-template/versions",
            Some(json!({"templateBody": v2})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(
        (
            created["versionId"].as_i64(),
            created["isDefaultVersion"].as_bool()
        ),
        (Some(2), Some(false))
    );
    let v3 = json!({"Resources": {}, "DeviceConfiguration": {"v": "3"}}).to_string();
    let (_, _, created) = fake
        .http(
            "POST",
            "/provisioning-templates/gw-template/versions?setAsDefault=true",
            Some(json!({"templateBody": v3})),
        )
        .await;
    assert_eq!(
        (
            created["versionId"].as_i64(),
            created["isDefaultVersion"].as_bool()
        ),
        (Some(3), Some(true))
    );
    let (_, _, described) = fake
        .http("GET", "/provisioning-templates/gw-template", None)
        .await;
    assert_eq!(
        (
            described["defaultVersionId"].as_i64(),
            described["templateBody"].as_str()
        ),
        (Some(3), Some(v3.as_str()))
    );
    let (_, _, versions) = fake
        .http("GET", "/provisioning-templates/gw-template/versions", None)
        .await;
    let listed: Vec<(i64, bool)> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["versionId"].as_i64().unwrap(),
                v["isDefaultVersion"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, [(1, false), (2, false), (3, true)]);
    let (_, _, version) = fake
        .http(
            "GET",
            "/provisioning-templates/gw-template/versions/2",
            None,
        )
        .await;
    assert_eq!(version["templateBody"], v2);
    assert_error(
        fake.http(
            "DELETE",
            "/provisioning-templates/gw-template/versions/3",
            None,
        )
        .await,
        409,
        "DeleteConflictException",
        "default",
    );
    let (status, _, _) = fake
        .http(
            "PATCH",
            "/provisioning-templates/gw-template",
            Some(json!({"defaultVersionId": 1})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, _, described) = fake
        .http("GET", "/provisioning-templates/gw-template", None)
        .await;
    assert_eq!(described["templateBody"], body);
    assert_error(
        fake.http(
            "PATCH",
            "/provisioning-templates/gw-template",
            Some(json!({"defaultVersionId": 9})),
        )
        .await,
        404,
        "ResourceNotFoundException",
        "Version 9",
    );

    let (_, _, list) = fake.http("GET", "/provisioning-templates", None).await;
    let names: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["templateName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gw-template"]);
    assert_eq!(list["templates"][0]["enabled"], true);

    let (status, _, _) = fake
        .http("DELETE", "/provisioning-templates/gw-template", None)
        .await;
    assert_eq!(status, 200);
    assert_error(
        fake.http("GET", "/provisioning-templates/gw-template", None)
            .await,
        404,
        "ResourceNotFoundException",
        "gw-template",
    );
}

#[tokio::test]
async fn provisioning_claims_are_temporary_hidden_and_scoped_to_their_template() {
    let fake = Fake::start(&[("gw", device_template())], &[]).await;
    assert_error(
        fake.http(
            "POST",
            "/provisioning-templates/gw-template/provisioning-claim",
            None,
        )
        .await,
        404,
        "ResourceNotFoundException",
        "Template gw-template not found",
    );
    let before = now(&fake).await;
    let (status, _, claim) = fake
        .http(
            "POST",
            "/provisioning-templates/gw/provisioning-claim",
            None,
        )
        .await;
    assert_eq!(status, 200, "{claim}");
    let identity = Identity {
        cert_pem: claim["certificatePem"].as_str().unwrap().to_owned(),
        key_pem: claim["keyPair"]["PrivateKey"].as_str().unwrap().to_owned(),
    };
    let id = claim["certificateId"].as_str().unwrap().to_owned();
    assert_eq!(identity.certificate_id(), id);
    assert!(
        identity
            .key_pem
            .starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
    assert!(
        claim["keyPair"]["PublicKey"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let lifetime = claim["expiration"].as_i64().unwrap() - before;
    assert!(
        (295..=305).contains(&lifetime),
        "a claim lives 5 minutes, not {lifetime} s"
    );

    // Not a certificate of the account.
    let (_, _, certificates) = fake.http("GET", "/certificates", None).await;
    assert!(
        certificates["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["certificateId"] != id.as_str())
    );
    assert_error(
        fake.http("GET", &format!("/certificates/{id}"), None).await,
        404,
        "ResourceNotFoundException",
        &id,
    );

    // It may use this template's provisioning topics, and nothing else.
    let mut m = Mqtt::connect(&fake, &identity, "installer-1")
        .await
        .unwrap();
    let granted = m
        .subscribe("$aws/provisioning-templates/gw/provision/json/accepted")
        .await;
    assert!(
        matches!(granted[0], rumqttc::SubscribeReasonCode::Success(_)),
        "{granted:?}"
    );
    let other = m
        .subscribe("$aws/provisioning-templates/other/provision/json/accepted")
        .await;
    assert_eq!(other, [rumqttc::SubscribeReasonCode::Failure]);
    drop(m);
    let device = provision_csr(
        &fake,
        &identity,
        "gw",
        &BTreeMap::from([("SerialNumber", "T1")]),
        "installer-2",
    )
    .await
    .unwrap();
    assert_eq!(device.thing_name, "gw-T1");
}

#[tokio::test]
async fn certificates_policies_things_and_principals() {
    let fake = Fake::start(
        &[("gw", simple_template())],
        &["--claim", "factory=gw", "--no-connect-throttle"],
    )
    .await;
    let id = fake.ready["claims"]["factory"]["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    let cert = arn(&format!("cert/{id}"));

    let (status, _, described) = fake.http("GET", &format!("/certificates/{id}"), None).await;
    assert_eq!(status, 200);
    let d = &described["certificateDescription"];
    assert_eq!(
        (d["certificateArn"].as_str(), d["status"].as_str()),
        (Some(cert.as_str()), Some("ACTIVE"))
    );
    assert_eq!(
        (d["ownedBy"].as_str(), d["certificateMode"].as_str()),
        (Some("123456789012"), Some("DEFAULT"))
    );
    assert!(
        d["certificatePem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert!(d["validity"]["notBefore"].is_i64() && d["validity"]["notAfter"].is_i64());
    assert!(
        d["creationDate"].is_i64()
            && d["customerVersion"].is_i64()
            && d["generationId"].is_string()
    );
    assert_error(
        fake.http("GET", "/certificates/xyz", None).await,
        400,
        "InvalidRequestException",
        "xyz",
    );
    let (_, _, list) = fake.http("GET", "/certificates", None).await;
    assert_eq!(list["certificates"][0]["certificateId"], id.as_str());

    // Policies.
    let document = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]})
        .to_string();
    let (status, _, created) = fake
        .http(
            "POST",
            "/policies/all",
            Some(json!({"policyDocument": document})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        created,
        json!({"policyName": "all", "policyArn": arn("policy/all"), "policyDocument": document, "policyVersionId": "1"})
    );
    assert_error(
        fake.http(
            "POST",
            "/policies/all",
            Some(json!({"policyDocument": document})),
        )
        .await,
        409,
        "ResourceAlreadyExistsException",
        "all",
    );
    assert_error(
        fake.http(
            "POST",
            "/policies/bad",
            Some(json!({"policyDocument": "{\"Statement\": []}"})),
        )
        .await,
        400,
        "MalformedPolicyException",
        "Version",
    );
    let (_, _, got) = fake.http("GET", "/policies/all", None).await;
    assert_eq!(
        (
            got["defaultVersionId"].as_str(),
            got["policyDocument"].as_str()
        ),
        (Some("1"), Some(document.as_str()))
    );
    assert_error(
        fake.http("GET", "/policies/none", None).await,
        404,
        "ResourceNotFoundException",
        "none",
    );
    let (status, _, _) = fake
        .http("PUT", "/target-policies/all", Some(json!({"target": cert})))
        .await;
    assert_eq!(status, 200);
    let (status, _, attached) = fake
        .http(
            "POST",
            &format!("/attached-policies/{}", encode(&cert)),
            None,
        )
        .await;
    assert_eq!(status, 200, "{attached}");
    let names: Vec<&str> = attached["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["policyName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["all", "fake-claim-gw"]);
    let (_, _, targets) = fake.http("POST", "/policy-targets/all", None).await;
    assert_eq!(targets["targets"], json!([cert]));
    assert_error(
        fake.http("DELETE", "/policies/all", None).await,
        409,
        "DeleteConflictException",
        &id,
    );
    let (status, _, _) = fake
        .http(
            "POST",
            "/target-policies/all",
            Some(json!({"target": cert})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = fake.http("DELETE", "/policies/all", None).await;
    assert_eq!(status, 200);

    // Things and principals.
    let attrs = json!({"attributePayload": {"attributes": {"site": "lab"}}});
    let (status, _, created) = fake.http("POST", "/things/gw-1", Some(attrs.clone())).await;
    assert_eq!(status, 200);
    assert_eq!(created["thingArn"], arn("thing/gw-1"));
    let thing_id = created["thingId"].clone();
    // The same configuration again succeeds; a different one is a conflict (AWS).
    let (status, _, again) = fake.http("POST", "/things/gw-1", Some(attrs)).await;
    assert_eq!((status, &again["thingId"]), (200, &thing_id));
    assert_error(
        fake.http("POST", "/things/gw-1", None).await,
        409,
        "ResourceAlreadyExistsException",
        "gw-1",
    );
    let (_, _, thing) = fake.http("GET", "/things/gw-1", None).await;
    assert_eq!(
        thing,
        json!({"defaultClientId": "gw-1", "thingName": "gw-1", "thingId": thing_id, "thingArn": arn("thing/gw-1"),
               "attributes": {"site": "lab"}, "version": 1})
    );
    assert_error(
        fake.http("GET", "/things/gw-2", None).await,
        404,
        "ResourceNotFoundException",
        "Thing gw-2 not found",
    );
    let base = fake.http_url();
    let principal = [("x-amzn-principal", cert.as_str())];
    let (status, _, _) = http_call(&base, "PUT", "/things/gw-1/principals", None, &principal).await;
    assert_eq!(status, 200);
    assert_error(
        http_call(&base, "PUT", "/things/gw-2/principals", None, &principal).await,
        404,
        "ResourceNotFoundException",
        "gw-2",
    );
    let (_, _, principals) = fake.http("GET", "/things/gw-1/principals", None).await;
    assert_eq!(principals["principals"], json!([cert]));
    let (_, _, things) = http_call(&base, "GET", "/principals/things", None, &principal).await;
    assert_eq!(things["things"], json!(["gw-1"]));
    assert_error(
        fake.http("DELETE", "/things/gw-1", None).await,
        400,
        "InvalidRequestException",
        "principal",
    );

    // Deactivating the certificate closes its connections and refuses new ones.
    let claim = fake.claim("factory");
    let mut m = Mqtt::connect(&fake, &claim, "claim-1").await.unwrap();
    let (status, _, _) = fake
        .http(
            "PUT",
            &format!("/certificates/{id}?newStatus=INACTIVE"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    m.expect_closed().await;
    Mqtt::connect(&fake, &claim, "claim-1").await.refusal();
    let (_, _, described) = fake.http("GET", &format!("/certificates/{id}"), None).await;
    assert_eq!(described["certificateDescription"]["status"], "INACTIVE");
    assert_error(
        fake.http(
            "PUT",
            &format!("/certificates/{id}?newStatus=PENDING_TRANSFER"),
            None,
        )
        .await,
        400,
        "InvalidRequestException",
        "PENDING_TRANSFER",
    );
    fake.http(
        "PUT",
        &format!("/certificates/{id}?newStatus=REVOKED"),
        None,
    )
    .await;
    assert_error(
        fake.http("PUT", &format!("/certificates/{id}?newStatus=ACTIVE"), None)
            .await,
        406,
        "CertificateStateException",
        "revoked",
    );

    // Deletion: not while attached to a thing, nor with policies unless forced.
    assert_error(
        fake.http("DELETE", &format!("/certificates/{id}"), None)
            .await,
        409,
        "DeleteConflictException",
        "gw-1",
    );
    let (status, _, _) =
        http_call(&base, "DELETE", "/things/gw-1/principals", None, &principal).await;
    assert_eq!(status, 200);
    assert_error(
        fake.http("DELETE", &format!("/certificates/{id}"), None)
            .await,
        409,
        "DeleteConflictException",
        "forceDelete",
    );
    let (status, _, _) = fake
        .http(
            "DELETE",
            &format!("/certificates/{id}?forceDelete=true"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_error(
        fake.http("GET", &format!("/certificates/{id}"), None).await,
        404,
        "ResourceNotFoundException",
        &id,
    );
    let (status, _, _) = fake.http("DELETE", "/things/gw-1", None).await;
    assert_eq!(status, 200);
    // Deleting a thing that does not exist succeeds, as on AWS.
    let (status, _, _) = fake.http("DELETE", "/things/gw-1", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn things_update_list_types_and_groups() {
    let fake = Fake::start(&[], &[]).await;
    let (status, _, created) = fake
        .http(
            "POST",
            "/thing-types/Gateway",
            Some(json!({"thingTypeProperties": {"thingTypeDescription": "gw"}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            created["thingTypeName"].as_str(),
            created["thingTypeArn"].clone()
        ),
        (Some("Gateway"), json!(arn("thingtype/Gateway")))
    );
    let (_, _, described) = fake.http("GET", "/thing-types/Gateway", None).await;
    assert_eq!(
        described["thingTypeProperties"]["thingTypeDescription"],
        "gw"
    );
    assert_eq!(described["thingTypeMetadata"]["deprecated"], false);
    assert_error(
        fake.http(
            "POST",
            "/things/gw-1",
            Some(json!({"thingTypeName": "Sensor"})),
        )
        .await,
        404,
        "ResourceNotFoundException",
        "Sensor",
    );
    for (name, body) in [
        (
            "gw-1",
            json!({"thingTypeName": "Gateway", "attributePayload": {"attributes": {"site": "lab", "rev": "a"}}}),
        ),
        (
            "gw-2",
            json!({"attributePayload": {"attributes": {"site": "field"}}}),
        ),
        ("gw-3", json!({})),
    ] {
        assert_eq!(
            fake.http("POST", &format!("/things/{name}"), Some(body))
                .await
                .0,
            200
        );
    }
    let (status, _, _) = fake
        .http(
            "PATCH",
            "/things/gw-1",
            Some(json!({"attributePayload": {"attributes": {"rev": "", "fw": "2"}, "merge": true}, "expectedVersion": 1})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, _, thing) = fake.http("GET", "/things/gw-1", None).await;
    assert_eq!(
        (thing["attributes"].clone(), thing["version"].as_i64()),
        (json!({"site": "lab", "fw": "2"}), Some(2))
    );
    assert_error(
        fake.http("PATCH", "/things/gw-1", Some(json!({"expectedVersion": 1})))
            .await,
        409,
        "VersionConflictException",
        "gw-1",
    );
    let (_, _, listed) = fake
        .http("GET", "/things?attributeName=site&attributeValue=lab", None)
        .await;
    assert_eq!(listed["things"].as_array().unwrap().len(), 1);
    assert_eq!(listed["things"][0]["thingTypeName"], "Gateway");
    // Pages of one, following nextToken.
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            Some(t) => format!("/things?maxResults=1&nextToken={t}"),
            None => "/things?maxResults=1".to_owned(),
        };
        let (_, _, page) = fake.http("GET", &path, None).await;
        names.extend(
            page["things"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["thingName"].as_str().unwrap().to_owned()),
        );
        match page["nextToken"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(names, ["gw-1", "gw-2", "gw-3"]);

    let (status, _, group) = fake.http("POST", "/thing-groups/fleet", None).await;
    assert_eq!(status, 200);
    assert_eq!(group["thingGroupArn"], arn("thinggroup/fleet"));
    fake.http(
        "POST",
        "/thing-groups/eu",
        Some(json!({"parentGroupName": "fleet"})),
    )
    .await;
    assert_error(
        fake.http(
            "POST",
            "/thing-groups/x",
            Some(json!({"parentGroupName": "nope"})),
        )
        .await,
        400,
        "InvalidRequestException",
        "nope",
    );
    let (_, _, eu) = fake.http("GET", "/thing-groups/eu", None).await;
    assert_eq!(eu["thingGroupMetadata"]["parentGroupName"], "fleet");
    assert_eq!(
        eu["thingGroupMetadata"]["rootToParentThingGroups"],
        json!([{"groupName": "fleet", "groupArn": arn("thinggroup/fleet")}])
    );
    let add = |group: &str, thing: &str| json!({"thingGroupName": group, "thingName": thing});
    assert_eq!(
        fake.http(
            "PUT",
            "/thing-groups/addThingToThingGroup",
            Some(add("eu", "gw-1"))
        )
        .await
        .0,
        200
    );
    let by_arn = json!({"thingGroupArn": arn("thinggroup/fleet"), "thingArn": arn("thing/gw-2")});
    assert_eq!(
        fake.http("PUT", "/thing-groups/addThingToThingGroup", Some(by_arn))
            .await
            .0,
        200
    );
    assert_error(
        fake.http(
            "PUT",
            "/thing-groups/addThingToThingGroup",
            Some(add("eu", "gw-9")),
        )
        .await,
        404,
        "ResourceNotFoundException",
        "gw-9",
    );
    let (_, _, members) = fake
        .http("GET", "/thing-groups/fleet/things?recursive=true", None)
        .await;
    assert_eq!(members["things"], json!(["gw-1", "gw-2"]));
    let (_, _, members) = fake.http("GET", "/thing-groups/fleet/things", None).await;
    assert_eq!(members["things"], json!(["gw-2"]));
    fake.http(
        "PUT",
        "/thing-groups/removeThingFromThingGroup",
        Some(add("fleet", "gw-2")),
    )
    .await;
    let (_, _, members) = fake
        .http("GET", "/thing-groups/fleet/things?recursive=true", None)
        .await;
    assert_eq!(members["things"], json!(["gw-1"]));
    let (_, _, groups) = fake
        .http("GET", "/thing-groups?parentGroup=fleet", None)
        .await;
    assert_eq!(
        groups["thingGroups"],
        json!([{"groupName": "eu", "groupArn": arn("thinggroup/eu")}])
    );
}

#[tokio::test]
async fn jobs_expand_groups_notify_devices_and_cancel() {
    let fake = Fake::start(&[("gw", device_template())], &["--claim", "factory=gw"]).await;
    let device = provision_csr(
        &fake,
        &fake.claim("factory"),
        "gw",
        &BTreeMap::from([("SerialNumber", "J1")]),
        "claim-J1",
    )
    .await
    .unwrap();
    let mut m = Mqtt::connect(&fake, &device.identity, &device.thing_name)
        .await
        .unwrap();
    m.subscribe("$aws/things/gw-J1/jobs/notify-next").await;

    fake.http("POST", "/things/gw-J2", None).await;
    fake.http("POST", "/thing-groups/fleet", None).await;
    fake.http(
        "POST",
        "/thing-groups/eu",
        Some(json!({"parentGroupName": "fleet"})),
    )
    .await;
    fake.http(
        "PUT",
        "/thing-groups/addThingToThingGroup",
        Some(json!({"thingGroupName": "eu", "thingName": "gw-J1"})),
    )
    .await;

    let document = json!({"operation": "ROTATE_CERTIFICATE"}).to_string();
    let job =
        |targets: Value| json!({"targets": targets, "document": document, "description": "rotate"});
    let targets = json!([arn("thinggroup/fleet"), arn("thing/gw-J2")]);
    let (status, _, created) = fake
        .http("PUT", "/jobs/rotate-1", Some(job(targets.clone())))
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(
        created,
        json!({"jobArn": arn("job/rotate-1"), "jobId": "rotate-1", "description": "rotate"})
    );
    let (_, payload) = m.expect_message("$aws/things/gw-J1/jobs/notify-next").await;
    let pushed: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(pushed["execution"]["jobId"], "rotate-1");
    assert_eq!(
        pushed["execution"]["jobDocument"]["operation"],
        "ROTATE_CERTIFICATE"
    );

    assert_error(
        fake.http("PUT", "/jobs/rotate-1", Some(job(targets))).await,
        409,
        "ResourceAlreadyExistsException",
        "rotate-1",
    );
    assert_error(
        fake.http(
            "PUT",
            "/jobs/rotate-2",
            Some(json!({"targets": [arn("thing/gw-J2")], "document": "{nope"})),
        )
        .await,
        400,
        "InvalidRequestException",
        "JSON",
    );
    assert_error(
        fake.http(
            "PUT",
            "/jobs/rotate-3",
            Some(job(json!([arn("thing/gw-none")]))),
        )
        .await,
        404,
        "ResourceNotFoundException",
        "gw-none",
    );

    let (status, _, described) = fake.http("GET", "/jobs/rotate-1", None).await;
    assert_eq!(status, 200);
    let j = &described["job"];
    assert_eq!(
        (j["status"].as_str(), j["targetSelection"].as_str()),
        (Some("IN_PROGRESS"), Some("SNAPSHOT"))
    );
    assert_eq!(j["jobProcessDetails"]["numberOfQueuedThings"], 2);
    let (_, _, doc) = fake.http("GET", "/jobs/rotate-1/job-document", None).await;
    assert_eq!(
        serde_json::from_str::<Value>(doc["document"].as_str().unwrap()).unwrap()["operation"],
        "ROTATE_CERTIFICATE"
    );

    let (status, _, execution) = fake.http("GET", "/things/gw-J1/jobs/rotate-1", None).await;
    assert_eq!(status, 200);
    let e = &execution["execution"];
    assert_eq!(
        (
            e["jobId"].as_str(),
            e["status"].as_str(),
            e["thingArn"].as_str()
        ),
        (
            Some("rotate-1"),
            Some("QUEUED"),
            Some(arn("thing/gw-J1").as_str())
        )
    );
    assert_eq!(
        (e["executionNumber"].as_i64(), e["versionNumber"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(e["statusDetails"], json!({"detailsMap": {}}));
    assert!(e["queuedAt"].is_i64() && e["lastUpdatedAt"].is_i64());
    assert_error(
        fake.http("GET", "/things/gw-J1/jobs/rotate-9", None).await,
        404,
        "ResourceNotFoundException",
        "rotate-9",
    );
    let (_, _, for_job) = fake.http("GET", "/jobs/rotate-1/things", None).await;
    let things: Vec<&str> = for_job["executionSummaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["thingArn"].as_str().unwrap())
        .collect();
    assert_eq!(things, [arn("thing/gw-J1"), arn("thing/gw-J2")]);

    // Cancelling empties the device's queue: notify-next without an execution.
    let (status, _, _) = fake
        .http(
            "PUT",
            "/jobs/rotate-1/cancel",
            Some(json!({"comment": "not needed"})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, payload) = m.expect_message("$aws/things/gw-J1/jobs/notify-next").await;
    let pushed: Value = serde_json::from_slice(&payload).unwrap();
    assert!(pushed.get("execution").is_none(), "{pushed}");
    let (_, _, described) = fake.http("GET", "/jobs/rotate-1", None).await;
    assert_eq!(described["job"]["status"], "CANCELED");
    assert_eq!(
        described["job"]["jobProcessDetails"]["numberOfCanceledThings"],
        2
    );
    let (_, _, execution) = fake.http("GET", "/things/gw-J2/jobs/rotate-1", None).await;
    assert_eq!(
        (
            execution["execution"]["status"].as_str(),
            execution["execution"]["versionNumber"].as_i64()
        ),
        (Some("CANCELED"), Some(2))
    );
    let (status, _, _) = fake.http("DELETE", "/jobs/rotate-1", None).await;
    assert_eq!(status, 200);
    assert_error(
        fake.http("GET", "/jobs/rotate-1", None).await,
        404,
        "ResourceNotFoundException",
        "rotate-1",
    );
    assert!(
        m.message_within(
            "$aws/things/gw-J1/jobs/notify-next",
            Duration::from_millis(200)
        )
        .await
        .is_none()
    );
}

#[tokio::test]
async fn endpoint_and_malformed_requests() {
    let fake = Fake::start(&[], &[]).await;
    let (status, _, endpoint) = fake
        .http("GET", "/endpoint?endpointType=iot:Data-ATS", None)
        .await;
    assert_eq!(
        (status, endpoint),
        (200, json!({"endpointAddress": "localhost"}))
    );
    assert_error(
        fake.http("GET", "/endpoint?endpointType=iot:Nope", None)
            .await,
        400,
        "InvalidRequestException",
        "iot:Nope",
    );
    let (status, kind, body) = http_call(
        &fake.http_url(),
        "POST",
        "/provisioning-templates",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (status, kind.as_deref()),
        (400, Some("InvalidRequestException")),
        "{body}"
    );
    assert_error(
        fake.http("GET", "/things?maxResults=0", None).await,
        400,
        "InvalidRequestException",
        "page size",
    );
    assert_error(
        fake.http("GET", "/things?maxResults=many", None).await,
        400,
        "InvalidRequestException",
        "query string",
    );
}

/// `/_fake/clock` refuses, with a 400 and a message like the rest of the API, a move the clock
/// cannot show (an overflow, a time before 1970 or after 9999, a number that is no i64), and
/// leaves the clock where it was; moves within range, back too, are applied.
#[tokio::test]
async fn the_clock_refuses_moves_out_of_its_range() {
    let fake = Fake::start(&[], &[]).await;
    let (status, _, body) = fake
        .http(
            "POST",
            "/_fake/clock",
            Some(json!({"advanceSeconds": 3600})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offsetSeconds"], 3600);
    let now = now(&fake).await;
    for (advance, mentions) in [
        (json!(i64::MAX), "overflows"),
        (json!(i64::MIN), "outside the range"),
        (json!(-now - 3600), "outside the range"),
        (json!(MAX_TIME - now + 3600), "outside the range"),
        (json!(9_223_372_036_854_775_808_u64), "clock: "),
        (json!(1e300), "clock: "),
    ] {
        let (status, _, body) = fake
            .http(
                "POST",
                "/_fake/clock",
                Some(json!({"advanceSeconds": advance})),
            )
            .await;
        assert_eq!(status, 400, "{advance}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "{advance}: {body}");
    }
    let (_, _, clock) = fake.http("GET", "/_fake/clock", None).await;
    assert_eq!(clock["offsetSeconds"], 3600, "{clock}");

    let (status, _, body) = fake
        .http(
            "POST",
            "/_fake/clock",
            Some(json!({"advanceSeconds": -7200})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["offsetSeconds"], -3600);
}
