//! AWS IoT policy documents and their evaluation for the MQTT data plane (`iot:Connect`,
//! `iot:Publish`, `iot:Subscribe`, `iot:Receive`, `iot:RetainPublish`).
//!
//! Supported: `Version` "2012-10-17", `Statement` as an object or a list, `Effect`, `Action`
//! and `Resource` as a string or a list, `*`/`?` wildcards, the IAM escapes `${*}` `${?}` `${$}`
//! and the policy variables a device policy uses in practice. Everything else a policy may
//! contain (`NotAction`, `NotResource`, `Condition`, other variables) is refused when the
//! document is parsed: silently ignoring it would make the emulator grant or deny differently
//! from AWS without anyone noticing.
//!
//! Evaluation follows AWS: a request is allowed iff some Allow statement of some attached policy
//! matches it and no Deny statement does (explicit deny wins, default deny).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The only policy language version that has policy variables; AWS IoT uses it throughout.
const VERSION: &str = "2012-10-17";

/// A parsed AWS IoT policy document.
#[derive(Debug, Clone)]
pub struct PolicyDocument {
    statements: Vec<Statement>,
}

/// Why a policy document was refused; the message names the element that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// The data-plane actions the broker asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    Publish,
    Subscribe,
    Receive,
    RetainPublish,
}

impl Action {
    /// The action's name as written in a policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "iot:Connect",
            Action::Publish => "iot:Publish",
            Action::Subscribe => "iot:Subscribe",
            Action::Receive => "iot:Receive",
            Action::RetainPublish => "iot:RetainPublish",
        }
    }
}

/// What the broker knows about the connection making the request.
#[derive(Debug, Clone, Default)]
pub struct Principal<'a> {
    pub region: &'a str,
    pub account: &'a str,
    pub client_id: &'a str,
    /// Set only when the client id is the name of a thing attached to this certificate.
    pub thing_name: Option<&'a str>,
    pub thing_attributes: Option<&'a BTreeMap<String, String>>,
    pub common_name: Option<&'a str>,
}

/// The resource ARN of `iot:Connect`.
pub fn client_arn(region: &str, account: &str, client_id: &str) -> String {
    format!("arn:aws:iot:{region}:{account}:client/{client_id}")
}

/// The resource ARN of `iot:Publish`, `iot:Receive` and `iot:RetainPublish`.
pub fn topic_arn(region: &str, account: &str, topic: &str) -> String {
    format!("arn:aws:iot:{region}:{account}:topic/{topic}")
}

/// The resource ARN of `iot:Subscribe` (the filter as the client sent it, `+`/`#` included).
pub fn topic_filter_arn(region: &str, account: &str, filter: &str) -> String {
    format!("arn:aws:iot:{region}:{account}:topicfilter/{filter}")
}

/// Evaluates all the policies attached to a certificate for one request.
pub fn is_allowed<'p>(
    policies: impl IntoIterator<Item = &'p PolicyDocument>,
    action: Action,
    resource_arn: &str,
    principal: &Principal<'_>,
) -> bool {
    // Action names match case-insensitively, so both sides are compared in lower case.
    let action: Vec<char> = action.as_str().to_lowercase().chars().collect();
    let resource: Vec<char> = resource_arn.chars().collect();
    let mut allowed = false;
    for policy in policies {
        for statement in &policy.statements {
            if !statement.matches(&action, &resource, principal) {
                continue;
            }
            match statement.effect {
                // Nothing can override an explicit deny, so there is no point looking further.
                Effect::Deny => return false,
                Effect::Allow => allowed = true,
            }
        }
    }
    allowed
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
struct Statement {
    effect: Effect,
    /// Lower-cased action patterns.
    actions: Vec<Vec<Glob>>,
    resources: Vec<Vec<Piece>>,
}

impl Statement {
    fn matches(&self, action: &[char], resource: &[char], principal: &Principal<'_>) -> bool {
        self.actions
            .iter()
            .any(|pattern| glob_match(pattern, action))
            && self.resources.iter().any(|pattern| {
                // An unresolvable variable makes this resource match nothing, as in AWS; it
                // must not fall back to the literal `${...}` text.
                substitute(pattern, principal).is_some_and(|glob| glob_match(&glob, resource))
            })
    }
}

/// One element of a wildcard pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Glob {
    Literal(char),
    /// `*`: any run of characters, `/` and `:` included, possibly empty.
    AnyRun,
    /// `?`: exactly one character.
    AnyOne,
}

/// One element of a resource pattern before its policy variables are substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Glob(Glob),
    Variable(Variable),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Variable {
    ThingName,
    IsAttached,
    ClientId,
    CommonName,
    ThingAttribute(String),
}

impl Variable {
    fn resolve<'a>(&'a self, principal: &Principal<'a>) -> Option<&'a str> {
        match self {
            Variable::ThingName => principal.thing_name,
            Variable::IsAttached => Some(if principal.thing_name.is_some() {
                "true"
            } else {
                "false"
            }),
            Variable::ClientId => Some(principal.client_id),
            Variable::CommonName => principal.common_name,
            // AWS resolves thing attributes only for the attached thing named by the client id,
            // so attributes without a thing name are not trusted.
            Variable::ThingAttribute(name) => principal
                .thing_name
                .and(principal.thing_attributes)
                .and_then(|attributes| attributes.get(name))
                .map(String::as_str),
        }
    }
}

/// The variables `parse_resource` accepts, for the error message refusing any other.
const SUPPORTED_VARIABLES: &str = "iot:Connection.Thing.ThingName, \
     iot:Connection.Thing.IsAttached, iot:ClientId, iot:Certificate.Subject.CommonName, \
     iot:Connection.Thing.Attributes[NAME]";

/// Replaces the policy variables of `pattern` with the principal's values, or `None` if one
/// cannot be resolved.
fn substitute(pattern: &[Piece], principal: &Principal<'_>) -> Option<Vec<Glob>> {
    let mut glob = Vec::with_capacity(pattern.len());
    for piece in pattern {
        match piece {
            Piece::Glob(g) => glob.push(g.clone()),
            // A substituted value is literal text: a client id or attribute value containing
            // `*` must not widen what the policy grants.
            Piece::Variable(variable) => {
                glob.extend(variable.resolve(principal)?.chars().map(Glob::Literal));
            }
        }
    }
    Some(glob)
}

/// Whether `text` matches the whole of `pattern`.
fn glob_match(pattern: &[Glob], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    // The most recent `*` and the text position it is currently assumed to end at; on a
    // mismatch it swallows one more character. Only the latest `*` needs revisiting, which
    // keeps this linear in practice instead of exponential.
    let mut backtrack: Option<(usize, usize)> = None;
    while let Some(&c) = text.get(t) {
        match pattern.get(p) {
            Some(Glob::AnyRun) => {
                backtrack = Some((p, t));
                p += 1;
            }
            Some(Glob::AnyOne) => {
                p += 1;
                t += 1;
            }
            Some(Glob::Literal(l)) if *l == c => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((star, end)) => {
                    backtrack = Some((star, end + 1));
                    p = star + 1;
                    t = end + 1;
                }
                None => return false,
            },
        }
    }
    pattern.iter().skip(p).all(|g| *g == Glob::AnyRun)
}

impl PolicyDocument {
    /// Parses a policy document, refusing anything this emulator would not evaluate as AWS does.
    pub fn parse(json: &str) -> Result<PolicyDocument, PolicyError> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| PolicyError(format!("policy document: invalid JSON: {e}")))?;
        let Value::Object(document) = value else {
            return Err(PolicyError(format!(
                "policy document: expected a JSON object, got {}",
                describe(&value)
            )));
        };
        refuse_unknown(
            &document,
            "policy document",
            &["Version", "Id", "Statement"],
        )?;

        match document.get("Version") {
            Some(Value::String(v)) if v == VERSION => {}
            // Other versions (2008-10-17) do not substitute policy variables; refusing them
            // beats evaluating `${...}` differently from AWS.
            Some(other) => {
                return Err(PolicyError(format!(
                    "Version: expected \"{VERSION}\", got {}",
                    describe(other)
                )));
            }
            None => {
                return Err(PolicyError(format!(
                    "Version: missing (expected \"{VERSION}\")"
                )));
            }
        }
        // `Id` is informational; only its type is checked.
        if let Some(id) = document.get("Id").filter(|id| !id.is_string()) {
            return Err(PolicyError(format!(
                "Id: expected a string, got {}",
                describe(id)
            )));
        }

        let statements = match document.get("Statement") {
            Some(Value::Object(statement)) => vec![parse_statement(statement, "Statement")?],
            Some(Value::Array(list)) if list.is_empty() => {
                return Err(PolicyError("Statement: empty list".to_string()));
            }
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let path = format!("Statement[{i}]");
                    match item {
                        Value::Object(statement) => parse_statement(statement, &path),
                        other => Err(PolicyError(format!(
                            "{path}: expected an object, got {}",
                            describe(other)
                        ))),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(PolicyError(format!(
                    "Statement: expected an object or a list of objects, got {}",
                    describe(other)
                )));
            }
            None => return Err(PolicyError("Statement: missing".to_string())),
        };
        Ok(PolicyDocument { statements })
    }
}

fn parse_statement(statement: &Map<String, Value>, path: &str) -> Result<Statement, PolicyError> {
    // Refused by name first so that the message says why rather than "unknown element".
    for element in [
        "NotAction",
        "NotResource",
        "Condition",
        "Principal",
        "NotPrincipal",
    ] {
        if statement.contains_key(element) {
            return Err(PolicyError(format!(
                "{path}: {element} is not supported by fake-iot-core (refused rather than \
                 ignored, since ignoring it would change what the policy allows)"
            )));
        }
    }
    refuse_unknown(statement, path, &["Sid", "Effect", "Action", "Resource"])?;

    // `Sid` is informational; only its type is checked.
    if let Some(sid) = statement.get("Sid").filter(|sid| !sid.is_string()) {
        return Err(PolicyError(format!(
            "{path}.Sid: expected a string, got {}",
            describe(sid)
        )));
    }
    let effect = match statement.get("Effect") {
        Some(Value::String(s)) if s == "Allow" => Effect::Allow,
        Some(Value::String(s)) if s == "Deny" => Effect::Deny,
        Some(other) => {
            return Err(PolicyError(format!(
                "{path}.Effect: expected Allow or Deny, got {}",
                describe(other)
            )));
        }
        None => return Err(PolicyError(format!("{path}.Effect: missing"))),
    };

    let actions = strings(statement, path, "Action")?
        .into_iter()
        .map(|(element, action)| {
            // IAM action names are `service:Name` or a bare `*`.
            if action != "*" && !action.contains(':') {
                return Err(PolicyError(format!(
                    "{element}: expected \"*\" or service:Action (e.g. iot:Publish), got {action}"
                )));
            }
            Ok(action.to_lowercase().chars().map(glob_char).collect())
        })
        .collect::<Result<Vec<_>, _>>()?;

    let resources = strings(statement, path, "Resource")?
        .into_iter()
        .map(|(element, resource)| {
            // A bare `topic/x` is a common mistake that would otherwise silently match nothing.
            if resource != "*" && !resource.starts_with("arn:") {
                return Err(PolicyError(format!(
                    "{element}: expected \"*\" or an ARN beginning with \"arn:\", got {resource}"
                )));
            }
            parse_resource(resource, &element)
        })
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Statement {
        effect,
        actions,
        resources,
    })
}

/// Reads `Action` or `Resource`: a non-empty string or a non-empty list of them. Each comes
/// with the path to name in errors about it.
fn strings<'s>(
    statement: &'s Map<String, Value>,
    path: &str,
    name: &str,
) -> Result<Vec<(String, &'s str)>, PolicyError> {
    let non_empty = |element: String, value: &'s Value| match value {
        Value::String(s) if !s.is_empty() => Ok((element, s.as_str())),
        other => Err(PolicyError(format!(
            "{element}: expected a non-empty string, got {}",
            describe(other)
        ))),
    };
    match statement.get(name) {
        Some(Value::Array(list)) if list.is_empty() => {
            Err(PolicyError(format!("{path}.{name}: empty list")))
        }
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, item)| non_empty(format!("{path}.{name}[{i}]"), item))
            .collect(),
        Some(other) => Ok(vec![non_empty(format!("{path}.{name}"), other)?]),
        None => Err(PolicyError(format!("{path}.{name}: missing"))),
    }
}

fn glob_char(c: char) -> Glob {
    match c {
        '*' => Glob::AnyRun,
        '?' => Glob::AnyOne,
        other => Glob::Literal(other),
    }
}

/// Splits a resource string into wildcards, literal characters and policy variables.
fn parse_resource(resource: &str, element: &str) -> Result<Vec<Piece>, PolicyError> {
    let mut pieces = Vec::with_capacity(resource.len());
    let mut rest = resource;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                return Err(PolicyError(format!(
                    "{element}: unterminated policy variable in {resource}"
                )));
            };
            let name = &after[..end];
            pieces.push(match name {
                // IAM's escapes for characters that would otherwise be special.
                "*" => Piece::Glob(Glob::Literal('*')),
                "?" => Piece::Glob(Glob::Literal('?')),
                "$" => Piece::Glob(Glob::Literal('$')),
                _ => Piece::Variable(parse_variable(name).ok_or_else(|| {
                    PolicyError(format!(
                        "{element}: unsupported policy variable ${{{name}}} (fake-iot-core \
                         supports {SUPPORTED_VARIABLES})"
                    ))
                })?),
            });
            rest = &after[end + 1..];
            continue;
        }
        // The AWS IoT guide spells the escapes `$(*)`, `$(?)`, `$($)`, unlike IAM's `${*}`;
        // accept both so that a policy copied from either works.
        if let Some(escaped) = ["$(*)", "$(?)", "$($)"]
            .iter()
            .find(|e| rest.starts_with(**e))
        {
            pieces.push(Piece::Glob(Glob::Literal(
                escaped.chars().nth(2).unwrap_or('$'),
            )));
            rest = &rest[escaped.len()..];
            continue;
        }
        // Any other `$` is literal, as in the reserved topics `$aws/...`.
        pieces.push(Piece::Glob(glob_char(c)));
        rest = &rest[c.len_utf8()..];
    }
    Ok(pieces)
}

/// Recognises a supported variable name. Names are case-insensitive as in IAM; an attribute
/// name is kept as written because thing attribute names are case-sensitive.
fn parse_variable(name: &str) -> Option<Variable> {
    const ATTRIBUTE_PREFIX: &str = "iot:connection.thing.attributes[";
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "iot:connection.thing.thingname" => Some(Variable::ThingName),
        "iot:connection.thing.isattached" => Some(Variable::IsAttached),
        "iot:clientid" => Some(Variable::ClientId),
        "iot:certificate.subject.commonname" => Some(Variable::CommonName),
        _ if lower.starts_with(ATTRIBUTE_PREFIX) && lower.ends_with(']') => {
            // The prefix is ASCII, so the byte offsets of `lower` are valid in `name`.
            let attribute = name.get(ATTRIBUTE_PREFIX.len()..name.len() - 1)?;
            (!attribute.is_empty()).then(|| Variable::ThingAttribute(attribute.to_string()))
        }
        _ => None,
    }
}

/// Refuses elements outside `known`, all of them at once so one round trip fixes them.
fn refuse_unknown(
    object: &Map<String, Value>,
    path: &str,
    known: &[&str],
) -> Result<(), PolicyError> {
    let mut unknown: Vec<&str> = object
        .keys()
        .map(String::as_str)
        .filter(|key| !known.contains(key))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    // Sorted so the message does not depend on serde_json's map ordering feature.
    unknown.sort_unstable();
    Err(PolicyError(format!(
        "{path}: unsupported element(s) {} (expected only {})",
        unknown.join(", "),
        known.join(", ")
    )))
}

/// A JSON value as it should appear after "got" in an error message.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) if s.is_empty() => "an empty string".to_string(),
        Value::String(s) => s.clone(),
        Value::Number(n) => format!("the number {n}"),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_string(),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const REGION: &str = "us-east-1";
    const ACCOUNT: &str = "123456789012";

    fn policy(json: &str) -> PolicyDocument {
        PolicyDocument::parse(json).unwrap()
    }

    fn principal<'a>(client_id: &'a str, thing_name: Option<&'a str>) -> Principal<'a> {
        Principal {
            region: REGION,
            account: ACCOUNT,
            client_id,
            thing_name,
            ..Principal::default()
        }
    }

    #[derive(Clone, Copy)]
    enum Kind {
        Client,
        Topic,
        Filter,
    }

    fn arn(kind: Kind, name: &str) -> String {
        match kind {
            Kind::Client => client_arn(REGION, ACCOUNT, name),
            Kind::Topic => topic_arn(REGION, ACCOUNT, name),
            Kind::Filter => topic_filter_arn(REGION, ACCOUNT, name),
        }
    }

    /// Runs a table of (action, resource kind, resource name, expected) against `policies`.
    fn check(
        policies: &[PolicyDocument],
        who: &Principal<'_>,
        cases: &[(Action, Kind, &str, bool)],
    ) {
        for &(action, kind, name, expected) in cases {
            let resource = arn(kind, name);
            assert_eq!(
                is_allowed(policies, action, &resource, who),
                expected,
                "{} on {resource}",
                action.as_str()
            );
        }
    }

    const CLAIM_POLICY: &str = r#"{
      "Version": "2012-10-17",
      "Statement": [
        { "Effect": "Allow", "Action": "iot:Connect", "Resource": "*" },
        {
          "Effect": "Allow",
          "Action": ["iot:Publish", "iot:Receive"],
          "Resource": [
            "arn:aws:iot:us-east-1:123456789012:topic/$aws/certificates/create/*",
            "arn:aws:iot:us-east-1:123456789012:topic/$aws/certificates/create-from-csr/*",
            "arn:aws:iot:us-east-1:123456789012:topic/$aws/provisioning-templates/Tpl/provision/*"
          ]
        },
        {
          "Effect": "Allow",
          "Action": "iot:Subscribe",
          "Resource": [
            "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/certificates/create/*",
            "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/certificates/create-from-csr/*",
            "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/provisioning-templates/Tpl/provision/*"
          ]
        }
      ]
    }"#;

    #[test]
    fn claim_policy() {
        use Action::*;
        use Kind::*;
        let policies = [policy(CLAIM_POLICY)];
        check(
            &policies,
            &principal("any-client", None),
            &[
                (Connect, Client, "any-client", true),
                (Connect, Client, "another", true),
                (Publish, Topic, "$aws/certificates/create/json", true),
                (
                    Receive,
                    Topic,
                    "$aws/certificates/create/json/accepted",
                    true,
                ),
                (
                    Receive,
                    Topic,
                    "$aws/certificates/create/cbor/rejected",
                    true,
                ),
                (
                    Subscribe,
                    Filter,
                    "$aws/certificates/create/json/accepted",
                    true,
                ),
                // `*` matches the MQTT wildcards too.
                (Subscribe, Filter, "$aws/certificates/create/#", true),
                (
                    Subscribe,
                    Filter,
                    "$aws/certificates/create/+/accepted",
                    true,
                ),
                (
                    Publish,
                    Topic,
                    "$aws/certificates/create-from-csr/json",
                    true,
                ),
                (
                    Subscribe,
                    Filter,
                    "$aws/certificates/create-from-csr/json/accepted",
                    true,
                ),
                (
                    Publish,
                    Topic,
                    "$aws/provisioning-templates/Tpl/provision/json",
                    true,
                ),
                (
                    Subscribe,
                    Filter,
                    "$aws/provisioning-templates/Tpl/provision/json/accepted",
                    true,
                ),
                // Topic vs topicfilter: Subscribe is checked on topicfilter/, Publish on topic/.
                (
                    Subscribe,
                    Topic,
                    "$aws/certificates/create/json/accepted",
                    false,
                ),
                (Publish, Filter, "$aws/certificates/create/json", false),
                (
                    Receive,
                    Filter,
                    "$aws/certificates/create/json/accepted",
                    false,
                ),
                // Another template, a broader filter, other topics: default deny.
                (
                    Publish,
                    Topic,
                    "$aws/provisioning-templates/Other/provision/json",
                    false,
                ),
                (
                    Subscribe,
                    Filter,
                    "$aws/provisioning-templates/Other/provision/json/accepted",
                    false,
                ),
                (Subscribe, Filter, "$aws/certificates/#", false),
                (Subscribe, Filter, "#", false),
                (Publish, Topic, "$aws/certificates/create", false),
                (Publish, Topic, "$aws/things/dev-1/jobs/get", false),
                (RetainPublish, Topic, "$aws/certificates/create/json", false),
            ],
        );
        // The same topic in another account or region is a different resource.
        let elsewhere = topic_arn("eu-west-1", ACCOUNT, "$aws/certificates/create/json");
        assert!(!is_allowed(
            &policies,
            Action::Publish,
            &elsewhere,
            &principal("c", None)
        ));
        let other_account = topic_arn(REGION, "999999999999", "$aws/certificates/create/json");
        assert!(!is_allowed(
            &policies,
            Action::Publish,
            &other_account,
            &principal("c", None)
        ));
    }

    const PRODUCTION_POLICY: &str = r#"{
      "Version": "2012-10-17",
      "Statement": [
        {
          "Effect": "Allow",
          "Action": "iot:Connect",
          "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"
        },
        {
          "Effect": "Allow",
          "Action": ["iot:Publish", "iot:Receive"],
          "Resource": "arn:aws:iot:us-east-1:123456789012:topic/$aws/things/${iot:Connection.Thing.ThingName}/jobs/*"
        },
        {
          "Effect": "Allow",
          "Action": "iot:Subscribe",
          "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/$aws/things/${iot:Connection.Thing.ThingName}/jobs/*"
        }
      ]
    }"#;

    #[test]
    fn production_policy_with_thing_name() {
        use Action::*;
        use Kind::*;
        let policies = [policy(PRODUCTION_POLICY)];
        check(
            &policies,
            &principal("dev-1", Some("dev-1")),
            &[
                (Connect, Client, "dev-1", true),
                (Connect, Client, "dev-2", false),
                (Publish, Topic, "$aws/things/dev-1/jobs/get", true),
                (Publish, Topic, "$aws/things/dev-1/jobs/job-7/update", true),
                (Receive, Topic, "$aws/things/dev-1/jobs/notify-next", true),
                (
                    Subscribe,
                    Filter,
                    "$aws/things/dev-1/jobs/notify-next",
                    true,
                ),
                (
                    Subscribe,
                    Filter,
                    "$aws/things/dev-1/jobs/+/get/accepted",
                    true,
                ),
                (Publish, Topic, "$aws/things/dev-2/jobs/get", false),
                (Receive, Topic, "$aws/things/dev-2/jobs/notify-next", false),
                (
                    Subscribe,
                    Filter,
                    "$aws/things/dev-2/jobs/notify-next",
                    false,
                ),
                (Subscribe, Filter, "$aws/things/+/jobs/notify-next", false),
                (
                    Subscribe,
                    Topic,
                    "$aws/things/dev-1/jobs/notify-next",
                    false,
                ),
                (Publish, Filter, "$aws/things/dev-1/jobs/get", false),
                (Publish, Topic, "$aws/things/dev-1/shadow/update", false),
            ],
        );
    }

    #[test]
    fn unresolved_variable_matches_nothing() {
        use Action::*;
        use Kind::*;
        let policies = [policy(PRODUCTION_POLICY)];
        // The certificate is not attached to a thing named by the client id.
        check(
            &policies,
            &principal("dev-1", None),
            &[
                (Connect, Client, "dev-1", false),
                (Publish, Topic, "$aws/things/dev-1/jobs/get", false),
                (
                    Subscribe,
                    Filter,
                    "$aws/things/dev-1/jobs/notify-next",
                    false,
                ),
                // Not even the literal variable text.
                (Connect, Client, "${iot:Connection.Thing.ThingName}", false),
                (
                    Publish,
                    Topic,
                    "$aws/things/${iot:Connection.Thing.ThingName}/jobs/get",
                    false,
                ),
                (Publish, Topic, "$aws/things//jobs/get", false),
            ],
        );
    }

    #[test]
    fn unresolved_variable_in_deny_does_not_deny() {
        let policies = [policy(
            r#"{"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "iot:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "iot:Publish",
                 "Resource": "arn:aws:iot:us-east-1:123456789012:topic/${iot:Connection.Thing.ThingName}/*"}
            ]}"#,
        )];
        let resource = topic_arn(REGION, ACCOUNT, "dev-1/telemetry");
        assert!(is_allowed(
            &policies,
            Action::Publish,
            &resource,
            &principal("dev-1", None)
        ));
        assert!(!is_allowed(
            &policies,
            Action::Publish,
            &resource,
            &principal("dev-1", Some("dev-1"))
        ));
    }

    #[test]
    fn deny_overrides_allow() {
        use Action::*;
        use Kind::*;
        let allow_all = r#"{"Version": "2012-10-17", "Statement":
            {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}}"#;
        let deny_secret = r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Deny", "Action": "iot:Publish",
             "Resource": "arn:aws:iot:us-east-1:123456789012:topic/secret/*"}]}"#;
        let both_in_one = r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Deny", "Action": "iot:Publish",
             "Resource": "arn:aws:iot:us-east-1:123456789012:topic/secret/*"},
            {"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}"#;
        let cases = [
            (Publish, Topic, "secret/x", false),
            (Publish, Topic, "secret/a/b", false),
            (Publish, Topic, "public/x", true),
            (Receive, Topic, "secret/x", true),
            (Subscribe, Filter, "secret/x", true),
            (Connect, Client, "c1", true),
        ];
        let who = principal("c1", None);
        // Across policies, in either order, and within one policy.
        check(&[policy(allow_all), policy(deny_secret)], &who, &cases);
        check(&[policy(deny_secret), policy(allow_all)], &who, &cases);
        check(&[policy(both_in_one)], &who, &cases);
        // A Deny alone grants nothing, and no policy at all is default deny.
        check(
            &[policy(deny_secret)],
            &who,
            &[(Publish, Topic, "public/x", false)],
        );
        check(&[], &who, &[(Connect, Client, "c1", false)]);
    }

    fn one_statement(action: &str, resource: &str) -> PolicyDocument {
        policy(
            &serde_json::json!({
                "Version": "2012-10-17",
                "Statement": {"Effect": "Allow", "Action": action, "Resource": resource}
            })
            .to_string(),
        )
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        let p = [one_statement(
            "iot:Publish",
            "arn:aws:iot:us-east-1:123456789012:topic/sensor/?/t",
        )];
        let who = principal("c", None);
        for (topic, expected) in [
            ("sensor/1/t", true),
            ("sensor/a/t", true),
            ("sensor/é/t", true),
            ("sensor//t", false),
            ("sensor/12/t", false),
            ("sensor/1/t/x", false),
        ] {
            let resource = topic_arn(REGION, ACCOUNT, topic);
            assert_eq!(
                is_allowed(&p, Action::Publish, &resource, &who),
                expected,
                "{topic}"
            );
        }
    }

    #[test]
    fn star_spans_slashes_and_resources_are_case_sensitive() {
        let p = [one_statement(
            "iot:Publish",
            "arn:aws:iot:*:123456789012:topic/a/*/z",
        )];
        let who = principal("c", None);
        for (region, topic, expected) in [
            (REGION, "a/b/z", true),
            ("eu-west-1", "a/b/c/z", true),
            (REGION, "a//z", true),
            (REGION, "a/z", false),
            (REGION, "A/b/z", false),
            (REGION, "a/b/Z", false),
            (REGION, "a/b/z/", false),
        ] {
            let resource = topic_arn(region, ACCOUNT, topic);
            assert_eq!(
                is_allowed(&p, Action::Publish, &resource, &who),
                expected,
                "{resource}"
            );
        }
    }

    #[test]
    fn action_wildcards_and_case() {
        use Action::*;
        let all = [Connect, Publish, Subscribe, Receive, RetainPublish];
        let who = principal("c", None);
        for (pattern, allowed) in [
            ("*", &all[..]),
            ("iot:*", &all[..]),
            ("IOT:publish", &[Publish][..]),
            ("iot:P*", &[Publish][..]),
            ("iot:*Publish", &[Publish, RetainPublish][..]),
            ("iot:Receiv?", &[Receive][..]),
            ("iot:Publish", &[Publish][..]),
            ("greengrass:*", &[][..]),
        ] {
            let p = [one_statement(pattern, "*")];
            for action in all {
                assert_eq!(
                    is_allowed(&p, action, "arn:aws:iot:us-east-1:1:topic/x", &who),
                    allowed.contains(&action),
                    "{pattern} vs {}",
                    action.as_str()
                );
            }
        }
    }

    #[test]
    fn mqtt_wildcards_are_literal() {
        let p = [one_statement(
            "iot:Subscribe",
            "arn:aws:iot:us-east-1:123456789012:topicfilter/a/+/c",
        )];
        let hash = [one_statement(
            "iot:Subscribe",
            "arn:aws:iot:us-east-1:123456789012:topicfilter/a/#",
        )];
        let who = principal("c", None);
        for (policies, filter, expected) in [
            (&p, "a/+/c", true),
            (&p, "a/b/c", false),
            (&p, "a/#", false),
            (&hash, "a/#", true),
            (&hash, "a/b", false),
            (&hash, "a/b/#", false),
        ] {
            let resource = topic_filter_arn(REGION, ACCOUNT, filter);
            assert_eq!(
                is_allowed(policies, Action::Subscribe, &resource, &who),
                expected,
                "{filter}"
            );
        }
    }

    #[test]
    fn escapes_are_literal_characters() {
        let who = principal("c", None);
        for (pattern, topic, expected) in [
            ("a${*}b", "a*b", true),
            ("a${*}b", "axb", false),
            ("a$(*)b", "a*b", true),
            ("a$(*)b", "axb", false),
            ("a${?}", "a?", true),
            ("a$(?)", "ax", false),
            ("${$}x", "$x", true),
            ("$($)x", "$x", true),
            ("$aws/x", "$aws/x", true),
            ("$(x)", "$(x)", true),
        ] {
            let p = [one_statement(
                "iot:Publish",
                &format!("arn:aws:iot:us-east-1:123456789012:topic/{pattern}"),
            )];
            let resource = topic_arn(REGION, ACCOUNT, topic);
            assert_eq!(
                is_allowed(&p, Action::Publish, &resource, &who),
                expected,
                "{pattern} vs {topic}"
            );
        }
    }

    #[test]
    fn other_variables() {
        let attributes = BTreeMap::from([
            ("site".to_string(), "berlin".to_string()),
            ("prefix".to_string(), "*".to_string()),
        ]);
        let attached = Principal {
            thing_attributes: Some(&attributes),
            common_name: Some("AWS IoT Certificate"),
            ..principal("dev-1", Some("dev-1"))
        };
        // Attributes are only trusted for an attached thing.
        let unattached = Principal {
            thing_attributes: Some(&attributes),
            ..principal("dev-1", None)
        };
        let base = "arn:aws:iot:us-east-1:123456789012:topic/";
        for (pattern, who, topic, expected) in [
            ("${iot:ClientId}/up", &attached, "dev-1/up", true),
            ("${iot:ClientId}/up", &unattached, "dev-1/up", true),
            ("${iot:ClientId}/up", &attached, "dev-2/up", false),
            ("${IOT:clientid}/up", &attached, "dev-1/up", true),
            (
                "attached/${iot:Connection.Thing.IsAttached}",
                &attached,
                "attached/true",
                true,
            ),
            (
                "attached/${iot:Connection.Thing.IsAttached}",
                &unattached,
                "attached/false",
                true,
            ),
            (
                "attached/${iot:Connection.Thing.IsAttached}",
                &unattached,
                "attached/true",
                false,
            ),
            (
                "cn/${iot:Certificate.Subject.CommonName}",
                &attached,
                "cn/AWS IoT Certificate",
                true,
            ),
            (
                "cn/${iot:Certificate.Subject.CommonName}",
                &unattached,
                "cn/",
                false,
            ),
            (
                "site/${iot:Connection.Thing.Attributes[site]}",
                &attached,
                "site/berlin",
                true,
            ),
            (
                "site/${iot:Connection.Thing.Attributes[site]}",
                &attached,
                "site/paris",
                false,
            ),
            (
                "site/${iot:Connection.Thing.Attributes[site]}",
                &unattached,
                "site/berlin",
                false,
            ),
            (
                "site/${iot:Connection.Thing.Attributes[Site]}",
                &attached,
                "site/berlin",
                false,
            ),
            (
                "site/${iot:Connection.Thing.Attributes[missing]}",
                &attached,
                "site/",
                false,
            ),
            // A substituted value is literal even if it contains a wildcard.
            (
                "p/${iot:Connection.Thing.Attributes[prefix]}/x",
                &attached,
                "p/*/x",
                true,
            ),
            (
                "p/${iot:Connection.Thing.Attributes[prefix]}/x",
                &attached,
                "p/any/x",
                false,
            ),
        ] {
            let p = [one_statement("iot:Publish", &format!("{base}{pattern}"))];
            let resource = topic_arn(REGION, ACCOUNT, topic);
            assert_eq!(
                is_allowed(&p, Action::Publish, &resource, who),
                expected,
                "{pattern} vs {topic}"
            );
        }
    }

    #[test]
    fn statement_as_single_object_and_optional_elements() {
        let p = [policy(
            r#"{"Version": "2012-10-17", "Id": "doc", "Statement":
                {"Sid": "connect", "Effect": "Allow", "Action": ["iot:Connect"],
                 "Resource": ["arn:aws:iot:us-east-1:123456789012:client/dev-1"]}}"#,
        )];
        let who = principal("dev-1", None);
        assert!(is_allowed(
            &p,
            Action::Connect,
            &client_arn(REGION, ACCOUNT, "dev-1"),
            &who
        ));
        assert!(!is_allowed(
            &p,
            Action::Connect,
            &client_arn(REGION, ACCOUNT, "dev-2"),
            &who
        ));
        assert!(!is_allowed(
            &p,
            Action::Publish,
            &client_arn(REGION, ACCOUNT, "dev-1"),
            &who
        ));
    }

    #[test]
    fn refused_documents() {
        let refused = "is not supported by fake-iot-core (refused rather than ignored, since \
                       ignoring it would change what the policy allows)";
        let v = r#""Version": "2012-10-17""#;
        let ok = r#""Effect": "Allow", "Action": "iot:Connect", "Resource": "*""#;
        let cases: Vec<(String, String)> = vec![
            ("[]".into(), "policy document: expected a JSON object, got a list".into()),
            (format!(r#"{{"Statement": {{{ok}}}}}"#), r#"Version: missing (expected "2012-10-17")"#.into()),
            (
                format!(r#"{{"Version": "2008-10-17", "Statement": {{{ok}}}}}"#),
                r#"Version: expected "2012-10-17", got 2008-10-17"#.into(),
            ),
            (
                format!(r#"{{"Version": 2012, "Statement": {{{ok}}}}}"#),
                r#"Version: expected "2012-10-17", got the number 2012"#.into(),
            ),
            (
                format!(r#"{{{v}, "Id": 1, "Statement": {{{ok}}}}}"#),
                "Id: expected a string, got the number 1".into(),
            ),
            (
                format!(r#"{{{v}, "Statment": [], "Extra": 1, "Statement": {{{ok}}}}}"#),
                "policy document: unsupported element(s) Extra, Statment (expected only Version, Id, \
                 Statement)"
                    .into(),
            ),
            (format!("{{{v}}}"), "Statement: missing".into()),
            (format!(r#"{{{v}, "Statement": []}}"#), "Statement: empty list".into()),
            (
                format!(r#"{{{v}, "Statement": "x"}}"#),
                "Statement: expected an object or a list of objects, got x".into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{{ok}}}, null]}}"#),
                "Statement[1]: expected an object, got null".into(),
            ),
            (
                format!(
                    r#"{{{v}, "Statement": [{{{ok}}},
                    {{"Effect": "allow", "Action": "iot:Connect", "Resource": "*"}}]}}"#
                ),
                "Statement[1].Effect: expected Allow or Deny, got allow".into(),
            ),
            (
                format!(r#"{{{v}, "Statement": {{"Action": "iot:Connect", "Resource": "*"}}}}"#),
                "Statement.Effect: missing".into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{"Effect": "Allow", "Resource": "*"}}]}}"#),
                "Statement[0].Action: missing".into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": [], "Resource": "*"}}]}}"#),
                "Statement[0].Action: empty list".into(),
            ),
            (
                format!(
                    r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": ["iot:Connect", 3],
                    "Resource": "*"}}]}}"#
                ),
                "Statement[0].Action[1]: expected a non-empty string, got the number 3".into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "", "Resource": "*"}}]}}"#),
                "Statement[0].Action: expected a non-empty string, got an empty string".into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "Publish", "Resource": "*"}}]}}"#),
                "Statement[0].Action: expected \"*\" or service:Action (e.g. iot:Publish), got Publish"
                    .into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "iot:Connect"}}]}}"#),
                "Statement[0].Resource: missing".into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "iot:Connect", "Resource": []}}]}}"#),
                "Statement[0].Resource: empty list".into(),
            ),
            (
                format!(
                    r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "iot:Publish",
                    "Resource": ["*", "topic/foo"]}}]}}"#
                ),
                "Statement[0].Resource[1]: expected \"*\" or an ARN beginning with \"arn:\", got topic/foo"
                    .into(),
            ),
            (
                format!(
                    r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "iot:Publish",
                    "Resource": "arn:aws:iot:r:a:topic/${{iot:Connection.Thing.ThingTypeName}}"}}]}}"#
                ),
                "Statement[0].Resource: unsupported policy variable \
                 ${iot:Connection.Thing.ThingTypeName} (fake-iot-core supports \
                 iot:Connection.Thing.ThingName, iot:Connection.Thing.IsAttached, iot:ClientId, \
                 iot:Certificate.Subject.CommonName, iot:Connection.Thing.Attributes[NAME])"
                    .into(),
            ),
            (
                format!(
                    r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "iot:Publish",
                    "Resource": "arn:aws:iot:r:a:topic/${{iot:Connection.Thing.Attributes[]}}"}}]}}"#
                ),
                "Statement[0].Resource: unsupported policy variable \
                 ${iot:Connection.Thing.Attributes[]} (fake-iot-core supports \
                 iot:Connection.Thing.ThingName, iot:Connection.Thing.IsAttached, iot:ClientId, \
                 iot:Certificate.Subject.CommonName, iot:Connection.Thing.Attributes[NAME])"
                    .into(),
            ),
            (
                format!(
                    r#"{{{v}, "Statement": [{{"Effect": "Allow", "Action": "iot:Publish",
                    "Resource": "arn:aws:iot:r:a:topic/${{iot:ClientId"}}]}}"#
                ),
                "Statement[0].Resource: unterminated policy variable in \
                 arn:aws:iot:r:a:topic/${iot:ClientId"
                    .into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{{ok}, "NotAction": "iot:Publish"}}]}}"#),
                format!("Statement[0]: NotAction {refused}"),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{{ok}}}, {{{ok}, "NotResource": "*"}}]}}"#),
                format!("Statement[1]: NotResource {refused}"),
            ),
            (
                format!(
                    r#"{{{v}, "Statement": [{{{ok}}}, {{{ok}}}, {{{ok},
                    "Condition": {{"Bool": {{"iot:Connection.Thing.IsAttached": "true"}}}}}}]}}"#
                ),
                format!("Statement[2]: Condition {refused}"),
            ),
            (
                format!(r#"{{{v}, "Statement": {{{ok}, "Principal": "*"}}}}"#),
                format!("Statement: Principal {refused}"),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{{ok}, "Effects": "Allow"}}]}}"#),
                "Statement[0]: unsupported element(s) Effects (expected only Sid, Effect, Action, \
                 Resource)"
                    .into(),
            ),
            (
                format!(r#"{{{v}, "Statement": [{{{ok}, "Sid": 7}}]}}"#),
                "Statement[0].Sid: expected a string, got the number 7".into(),
            ),
        ];
        for (json, expected) in cases {
            match PolicyDocument::parse(&json) {
                Ok(_) => panic!("accepted {json}"),
                Err(PolicyError(message)) => assert_eq!(message, expected, "for {json}"),
            }
        }
        let invalid = PolicyDocument::parse("{").unwrap_err();
        assert!(
            invalid.0.starts_with("policy document: invalid JSON: "),
            "{invalid}"
        );
    }

    #[test]
    fn arn_helpers_and_action_names() {
        assert_eq!(
            client_arn("eu-west-1", "42", "dev-1"),
            "arn:aws:iot:eu-west-1:42:client/dev-1"
        );
        assert_eq!(
            topic_arn("eu-west-1", "42", "$aws/things/t/jobs/get"),
            "arn:aws:iot:eu-west-1:42:topic/$aws/things/t/jobs/get"
        );
        assert_eq!(
            topic_filter_arn("eu-west-1", "42", "a/+/#"),
            "arn:aws:iot:eu-west-1:42:topicfilter/a/+/#"
        );
        let names: Vec<&str> = [
            Action::Connect,
            Action::Publish,
            Action::Subscribe,
            Action::Receive,
            Action::RetainPublish,
        ]
        .into_iter()
        .map(Action::as_str)
        .collect();
        assert_eq!(
            names,
            [
                "iot:Connect",
                "iot:Publish",
                "iot:Subscribe",
                "iot:Receive",
                "iot:RetainPublish"
            ]
        );
    }

    #[test]
    fn glob_backtracking() {
        let p: Vec<Glob> = "a*b*c".chars().map(glob_char).collect();
        for (text, expected) in [
            ("abc", true),
            ("aXbYc", true),
            ("abbbcc", true),
            ("abcb", false),
            ("ac", false),
            ("", false),
        ] {
            let text: Vec<char> = text.chars().collect();
            assert_eq!(glob_match(&p, &text), expected, "{text:?}");
        }
        assert!(glob_match(&[Glob::AnyRun], &[]));
        assert!(!glob_match(&[Glob::AnyOne], &[]));
        assert!(glob_match(&[], &[]));
    }
}
