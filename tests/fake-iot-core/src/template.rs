//! The AWS IoT fleet-provisioning template language (reference §3): a template body is parsed and
//! validated when it is stored (CreateProvisioningTemplate and its versions) and evaluated into a
//! [`Plan`] on every RegisterThing.
//!
//! Everything that can be known from the body alone is refused by [`Template::parse`], with the
//! JSON path of the offending value: unsupported sections, resources, properties and functions,
//! references to undeclared parameters or maps, wrong arity, and type mismatches (a list where a
//! string is needed and the other way round). The reference leaves open whether AWS refuses such
//! templates at creation or only at RegisterThing, and recommends the former for the emulator
//! because a broken template then fails where its author is looking. Only what depends on the
//! request's parameters is left to [`Template::evaluate`]: missing parameter values, `Fn::Select`
//! indexes, `Fn::FindInMap` keys, computed certificate statuses and policy documents, thing names.
//!
//! Paths are dotted JSON paths from the body's root with `[i]` for array elements, for example
//! `Resources.thing.Properties.ThingName.Fn::Join[1][0]`. Errors about a function object are
//! reported at the object's path, errors about one of its arguments at the argument's path.
//! Objects are walked in key order, so that the first of several mistakes reported does not depend
//! on whether serde_json happens to be built with `preserve_order`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The pseudo parameter every fleet template uses for the certificate made by the preceding create
/// call. AWS examples both declare it and use it undeclared, so both are accepted.
const CERTIFICATE_ID_PARAMETER: &str = "AWS::IoT::Certificate::Id";

const THING_TYPE: &str = "AWS::IoT::Thing";
const CERTIFICATE_TYPE: &str = "AWS::IoT::Certificate";
const POLICY_TYPE: &str = "AWS::IoT::Policy";

const SECTIONS: [&str; 4] = ["Parameters", "Mappings", "Resources", "DeviceConfiguration"];

/// Path used for errors about the body as a whole.
const BODY_PATH: &str = "templateBody";

/// A parsed and validated provisioning template, ready to be evaluated for any number of requests.
#[derive(Debug, Clone)]
pub struct Template {
    /// Declared parameters and their defaults, the pseudo parameter included when declared.
    parameters: BTreeMap<String, Option<String>>,
    mappings: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    thing: Option<ThingDef>,
    certificate: Option<CertificateDef>,
    /// In logical-name order, so that the plan's order does not depend on serde_json's features.
    policies: Vec<PolicyDef>,
    device_configuration: BTreeMap<String, StrExpr>,
}

/// A template refused when it is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TemplateError {
    pub path: String,
    pub message: String,
}

/// A template that could not be evaluated for one RegisterThing request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct EvalError {
    pub path: String,
    pub message: String,
}

/// What one RegisterThing has to do, with every intrinsic function already evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub thing: Option<ThingPlan>,
    pub certificate: Option<CertificatePlan>,
    /// Policies to create if needed and attach to the certificate, in logical-name order.
    pub policies: Vec<PolicyPlan>,
    pub device_configuration: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingPlan {
    pub name: String,
    pub attributes: Option<BTreeMap<String, String>>,
    pub thing_type: Option<String>,
    pub groups: Option<Vec<String>>,
    pub billing_group: Option<String>,
    /// `None` means the property has no entry in `OverrideSettings`.
    pub attributes_override: Option<Override>,
    pub thing_type_override: Option<Override>,
    pub groups_override: Option<Override>,
}

/// An `OverrideSettings` value: what to do when the resource already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    DoNothing,
    Replace,
    Fail,
    Merge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatePlan {
    pub certificate_id: String,
    pub active: bool,
    pub status_override: Option<Override>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyPlan {
    /// Attach an IoT policy that must already exist.
    Existing { name: String },
    /// Create (if not there yet) and attach a policy named after a hash of its document.
    Inline { name: String, document: String },
}

impl Template {
    /// Parses and validates a template body (the JSON string stored as templateBody).
    pub fn parse(body: &str) -> Result<Template, TemplateError> {
        let root: Value = serde_json::from_str(body)
            .map_err(|e| refuse(BODY_PATH, format!("parse the template body as JSON: {e}")))?;
        let Value::Object(root) = root else {
            return Err(refuse(
                BODY_PATH,
                format!(
                    "the template body must be a JSON object, found {}",
                    kind(&root)
                ),
            ));
        };
        for (key, _) in sorted(&root) {
            if !SECTIONS.contains(&key.as_str()) {
                return Err(refuse(
                    key,
                    "unsupported top-level section (fleet provisioning templates may only have \
                     Parameters, Mappings, Resources and DeviceConfiguration)",
                ));
            }
        }

        let parameters = match root.get("Parameters") {
            Some(value) => parse_parameters(value)?,
            None => BTreeMap::new(),
        };
        let mappings = match root.get("Mappings") {
            Some(value) => parse_mappings(value)?,
            None => BTreeMap::new(),
        };
        let parser = Parser {
            parameters: &parameters,
            mappings: &mappings,
        };
        // Resources is the core of a template (reference §3.2); a body without it is almost
        // certainly a mistake such as a misspelt section name, which the section check above
        // would already have reported, or a template pasted without its resources.
        let resources = root
            .get("Resources")
            .ok_or_else(|| refuse("Resources", "missing required section"))?;
        let resources = parser.resources(resources)?;
        let device_configuration = match root.get("DeviceConfiguration") {
            Some(value) => parser.device_configuration(value)?,
            None => BTreeMap::new(),
        };

        Ok(Template {
            parameters,
            mappings,
            thing: resources.thing,
            certificate: resources.certificate,
            policies: resources.policies,
            device_configuration,
        })
    }

    /// Names of declared parameters (not including the pseudo parameter), for
    /// DescribeProvisioningTemplate tooling.
    pub fn parameter_names(&self) -> Vec<String> {
        self.parameters
            .keys()
            .filter(|name| name.as_str() != CERTIFICATE_ID_PARAMETER)
            .cloned()
            .collect()
    }

    /// Evaluates with the request's parameters (device values already merged with hook overrides)
    /// and the id of the certificate created by the preceding create call.
    ///
    /// Request parameters the template does not declare are ignored, like AWS does with extra
    /// parameters. A value the request gives for the pseudo parameter is ignored too: the pseudo
    /// parameter names the certificate being registered, which only the service knows.
    pub fn evaluate(
        &self,
        parameters: &BTreeMap<String, String>,
        certificate_id: &str,
    ) -> Result<Plan, EvalError> {
        let evaluator = Evaluator {
            template: self,
            parameters,
            certificate_id,
        };
        let thing = self
            .thing
            .as_ref()
            .map(|def| evaluator.thing(def))
            .transpose()?;
        let certificate = self
            .certificate
            .as_ref()
            .map(|def| evaluator.certificate(def))
            .transpose()?;
        let policies = self
            .policies
            .iter()
            .map(|def| evaluator.policy(def))
            .collect::<Result<Vec<_>, _>>()?;
        let device_configuration = self
            .device_configuration
            .iter()
            .map(|(key, expr)| Ok((key.clone(), evaluator.string(expr)?)))
            .collect::<Result<BTreeMap<_, _>, EvalError>>()?;
        Ok(Plan {
            thing,
            certificate,
            policies,
            device_configuration,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Parsed form
// ---------------------------------------------------------------------------------------------

/// An expression that evaluates to a string. Paths are kept only where evaluation can fail.
#[derive(Debug, Clone)]
enum StrExpr {
    Literal(String),
    Ref {
        name: String,
        path: String,
    },
    Join {
        delimiter: String,
        list: Box<ListExpr>,
    },
    Select {
        index: Box<IndexExpr>,
        list: Box<ListExpr>,
        path: String,
    },
    FindInMap {
        map: Box<StrExpr>,
        top_key: Box<StrExpr>,
        second_key: Box<StrExpr>,
        path: String,
    },
    /// `Fn::Sub` after its `${...}` references have been resolved.
    Concat(Vec<StrExpr>),
}

/// An expression that evaluates to a list of strings.
#[derive(Debug, Clone)]
enum ListExpr {
    Items(Vec<StrExpr>),
    Split {
        delimiter: String,
        source: Box<StrExpr>,
    },
}

#[derive(Debug, Clone)]
enum IndexExpr {
    Fixed(usize),
    /// Computed by `Ref` or `Fn::FindInMap`, so only checkable at evaluation.
    Computed(StrExpr),
}

/// The two kinds of value an intrinsic function can yield.
#[derive(Debug)]
enum Typed {
    Str(StrExpr),
    List(ListExpr),
}

#[derive(Debug, Clone)]
struct ThingDef {
    name: StrExpr,
    name_path: String,
    attributes: Option<BTreeMap<String, StrExpr>>,
    thing_type: Option<StrExpr>,
    groups: Option<ListExpr>,
    billing_group: Option<StrExpr>,
    attributes_override: Option<Override>,
    thing_type_override: Option<Override>,
    groups_override: Option<Override>,
}

#[derive(Debug, Clone)]
struct CertificateDef {
    id: StrExpr,
    /// `None` when the template leaves `Status` out, which means ACTIVE.
    status: Option<(StrExpr, String)>,
    status_override: Option<Override>,
}

#[derive(Debug, Clone)]
enum PolicyDef {
    Existing(StrExpr),
    /// `PolicyDocument` given as a JSON object, possibly with intrinsic functions inside.
    InlineObject(JsonNode),
    /// `PolicyDocument` given as a string (literal or computed) that must hold a JSON object.
    InlineText {
        document: StrExpr,
        path: String,
    },
}

/// A JSON value from a policy document object, with intrinsic functions left to evaluate.
#[derive(Debug, Clone)]
enum JsonNode {
    Literal(Value),
    Str(StrExpr),
    List(ListExpr),
    Array(Vec<JsonNode>),
    /// In key order, so that the serialised document (and so the policy name) is the same
    /// whether or not serde_json keeps insertion order.
    Object(Vec<(String, JsonNode)>),
}

#[derive(Debug, Default)]
struct Resources {
    thing: Option<ThingDef>,
    certificate: Option<CertificateDef>,
    policies: Vec<PolicyDef>,
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

fn refuse(path: &str, message: impl Into<String>) -> TemplateError {
    TemplateError {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn element(path: &str, index: usize) -> String {
    format!("{path}[{index}]")
}

/// Entries of an object in key order (see the module documentation for why).
fn sorted(object: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<_> = object.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

/// A JSON type name for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Keys that make an object an intrinsic function call. `Condition` is included so that the
/// CloudFormation construct is reported as unsupported rather than as a stray object.
fn is_function_key(key: &str) -> bool {
    key == "Ref" || key == "Condition" || key.starts_with("Fn::")
}

fn looks_like_function(object: &Map<String, Value>) -> bool {
    object.keys().any(|key| is_function_key(key))
}

fn as_object<'v>(
    value: &'v Value,
    path: &str,
    what: &str,
) -> Result<&'v Map<String, Value>, TemplateError> {
    match value {
        Value::Object(object) => Ok(object),
        other => Err(refuse(
            path,
            format!("{what} must be an object, found {}", kind(other)),
        )),
    }
}

fn parse_parameters(value: &Value) -> Result<BTreeMap<String, Option<String>>, TemplateError> {
    let path = "Parameters";
    let section = as_object(value, path, "the Parameters section")?;
    let mut parameters = BTreeMap::new();
    for (name, declaration) in sorted(section) {
        let path = child(path, name);
        let declaration = as_object(declaration, &path, "a parameter declaration")?;
        for (key, _) in sorted(declaration) {
            if key != "Type" && key != "Default" {
                return Err(refuse(
                    &child(&path, key),
                    format!(
                        "unsupported parameter attribute {key} (parameters may only have Type and \
                         Default)"
                    ),
                ));
            }
        }
        match declaration.get("Type") {
            Some(Value::String(t)) if t == "String" => {}
            Some(other) => {
                return Err(refuse(
                    &child(&path, "Type"),
                    format!("unsupported parameter type {other} (only \"String\" is supported)"),
                ));
            }
            None => return Err(refuse(&path, "missing Type (must be \"String\")")),
        }
        let default = match declaration.get("Default") {
            Some(Value::String(default)) => Some(default.clone()),
            Some(other) => {
                return Err(refuse(
                    &child(&path, "Default"),
                    format!(
                        "a parameter default must be a string, found {}",
                        kind(other)
                    ),
                ));
            }
            None => None,
        };
        parameters.insert(name.clone(), default);
    }
    Ok(parameters)
}

/// Refuses an object that looks like a function call inside `Mappings`, where the documentation
/// forbids intrinsic functions, instead of taking `Ref` or `Fn::...` for a map key.
fn refuse_function_in_mappings(
    object: &Map<String, Value>,
    path: &str,
) -> Result<(), TemplateError> {
    if looks_like_function(object) {
        return Err(refuse(
            path,
            "intrinsic functions and parameters are not allowed in Mappings",
        ));
    }
    Ok(())
}

type Mappings = BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>;

fn parse_mappings(value: &Value) -> Result<Mappings, TemplateError> {
    let path = "Mappings";
    let section = as_object(value, path, "the Mappings section")?;
    let mut mappings = BTreeMap::new();
    for (map_name, map) in sorted(section) {
        let map_path = child(path, map_name);
        let map = as_object(map, &map_path, "a mapping")?;
        refuse_function_in_mappings(map, &map_path)?;
        let mut top_level = BTreeMap::new();
        for (top_key, second_level) in sorted(map) {
            let top_path = child(&map_path, top_key);
            let second_level = as_object(second_level, &top_path, "a mapping's top-level entry")?;
            refuse_function_in_mappings(second_level, &top_path)?;
            let mut values = BTreeMap::new();
            for (second_key, value) in sorted(second_level) {
                let value_path = child(&top_path, second_key);
                match value {
                    Value::String(s) => {
                        values.insert(second_key.clone(), s.clone());
                    }
                    Value::Object(object) if looks_like_function(object) => {
                        return Err(refuse(
                            &value_path,
                            "intrinsic functions and parameters are not allowed in Mappings",
                        ));
                    }
                    other => {
                        return Err(refuse(
                            &value_path,
                            format!("a mapping value must be a string, found {}", kind(other)),
                        ));
                    }
                }
            }
            top_level.insert(top_key.clone(), values);
        }
        mappings.insert(map_name.clone(), top_level);
    }
    Ok(mappings)
}

/// Parses everything that may hold intrinsic functions, checking references against the declared
/// parameters and mappings.
struct Parser<'a> {
    parameters: &'a BTreeMap<String, Option<String>>,
    mappings: &'a Mappings,
}

impl Parser<'_> {
    fn is_parameter(&self, name: &str) -> bool {
        name == CERTIFICATE_ID_PARAMETER || self.parameters.contains_key(name)
    }

    /// A value where a string is needed: a literal string or a function yielding one.
    fn string(&self, value: &Value, path: &str) -> Result<StrExpr, TemplateError> {
        match value {
            Value::String(s) => Ok(StrExpr::Literal(s.clone())),
            Value::Object(object) if looks_like_function(object) => {
                match self.function(object, path)? {
                    Typed::Str(expr) => Ok(expr),
                    Typed::List(_) => Err(refuse(
                        path,
                        format!(
                            "expected a string, but {} yields a list",
                            function_name(object)
                        ),
                    )),
                }
            }
            other => Err(refuse(
                path,
                format!(
                    "expected a string or an intrinsic function, found {}",
                    kind(other)
                ),
            )),
        }
    }

    /// A value where a list of strings is needed: a JSON array or a function yielding a list.
    fn list(&self, value: &Value, path: &str) -> Result<ListExpr, TemplateError> {
        match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.string(item, &element(path, i)))
                .collect::<Result<Vec<_>, _>>()
                .map(ListExpr::Items),
            Value::Object(object) if looks_like_function(object) => {
                match self.function(object, path)? {
                    Typed::List(list) => Ok(list),
                    Typed::Str(_) => Err(refuse(
                        path,
                        format!(
                            "expected a list, but {} yields a string",
                            function_name(object)
                        ),
                    )),
                }
            }
            other => Err(refuse(
                path,
                format!(
                    "expected a list or an intrinsic function yielding one, found {}",
                    kind(other)
                ),
            )),
        }
    }

    /// A function call object: exactly one key, naming one of the documented functions.
    fn function(&self, object: &Map<String, Value>, path: &str) -> Result<Typed, TemplateError> {
        if object.len() != 1 {
            let keys: Vec<&str> = sorted(object).iter().map(|(k, _)| k.as_str()).collect();
            return Err(refuse(
                path,
                format!(
                    "an intrinsic function object must have exactly one key, found {}",
                    keys.join(", ")
                ),
            ));
        }
        let name = function_name(object);
        let Some(argument) = object.get(name) else {
            return Err(refuse(path, "an intrinsic function object has no key"));
        };
        let argument_path = child(path, name);
        match name {
            "Ref" => self.reference(argument, path).map(Typed::Str),
            "Fn::Join" => self.join(argument, &argument_path).map(Typed::Str),
            "Fn::Select" => self.select(argument, path, &argument_path).map(Typed::Str),
            "Fn::Split" => self.split(argument, &argument_path).map(Typed::List),
            "Fn::FindInMap" => self
                .find_in_map(argument, path, &argument_path)
                .map(Typed::Str),
            "Fn::Sub" => self.sub(argument, &argument_path).map(Typed::Str),
            other => Err(refuse(path, format!("unsupported function {other}"))),
        }
    }

    fn reference(&self, argument: &Value, path: &str) -> Result<StrExpr, TemplateError> {
        let Value::String(name) = argument else {
            return Err(refuse(
                path,
                format!("Ref expects a parameter name, found {}", kind(argument)),
            ));
        };
        if !self.is_parameter(name) {
            return Err(refuse(path, format!("Ref to undeclared parameter {name}")));
        }
        Ok(StrExpr::Ref {
            name: name.clone(),
            path: path.to_owned(),
        })
    }

    /// The argument array of a function taking a fixed number of arguments.
    fn arguments<'v>(
        argument: &'v Value,
        path: &str,
        function: &str,
        shape: &str,
    ) -> Result<&'v [Value], TemplateError> {
        let count = shape.split(", ").count();
        match argument {
            Value::Array(items) if items.len() == count => Ok(items),
            Value::Array(items) => Err(refuse(
                path,
                format!(
                    "{function} expects {count} arguments [{shape}], found {}",
                    items.len()
                ),
            )),
            other => Err(refuse(
                path,
                format!(
                    "{function} expects an array [{shape}], found {}",
                    kind(other)
                ),
            )),
        }
    }

    /// Delimiters must be literal strings, as in CloudFormation: a computed delimiter is not
    /// documented for IoT templates.
    fn delimiter(value: &Value, path: &str, function: &str) -> Result<String, TemplateError> {
        match value {
            Value::String(s) => Ok(s.clone()),
            other => Err(refuse(
                path,
                format!(
                    "the {function} delimiter must be a literal string, found {}",
                    kind(other)
                ),
            )),
        }
    }

    fn join(&self, argument: &Value, path: &str) -> Result<StrExpr, TemplateError> {
        let args = Self::arguments(argument, path, "Fn::Join", "delimiter, list")?;
        let delimiter = Self::delimiter(&args[0], &element(path, 0), "Fn::Join")?;
        let list = self.list(&args[1], &element(path, 1))?;
        Ok(StrExpr::Join {
            delimiter,
            list: Box::new(list),
        })
    }

    fn split(&self, argument: &Value, path: &str) -> Result<ListExpr, TemplateError> {
        let args = Self::arguments(argument, path, "Fn::Split", "delimiter, source")?;
        let delimiter_path = element(path, 0);
        let delimiter = Self::delimiter(&args[0], &delimiter_path, "Fn::Split")?;
        // Splitting on nothing has no sensible meaning (Rust would yield empty strings at both
        // ends), and CloudFormation refuses it too.
        if delimiter.is_empty() {
            return Err(refuse(
                &delimiter_path,
                "the Fn::Split delimiter must not be empty",
            ));
        }
        let source = self.string(&args[1], &element(path, 1))?;
        Ok(ListExpr::Split {
            delimiter,
            source: Box::new(source),
        })
    }

    fn select(
        &self,
        argument: &Value,
        path: &str,
        argument_path: &str,
    ) -> Result<StrExpr, TemplateError> {
        let args = Self::arguments(argument, argument_path, "Fn::Select", "index, list")?;
        let index_path = element(argument_path, 0);
        let invalid = |found: String| {
            refuse(
                &index_path,
                format!("the Fn::Select index must be a non-negative integer, found {found}"),
            )
        };
        // The reference says to accept the index as a number or as a numeric string.
        let index = match &args[0] {
            Value::Number(n) => {
                let fixed = n
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| invalid(n.to_string()))?;
                IndexExpr::Fixed(fixed)
            }
            Value::String(s) => IndexExpr::Fixed(s.parse().map_err(|_| invalid(format!("{s:?}")))?),
            Value::Object(object) if looks_like_function(object) => {
                IndexExpr::Computed(self.string(&args[0], &index_path)?)
            }
            other => return Err(invalid(kind(other).to_owned())),
        };
        let list = self.list(&args[1], &element(argument_path, 1))?;
        Ok(StrExpr::Select {
            index: Box::new(index),
            list: Box::new(list),
            path: path.to_owned(),
        })
    }

    fn find_in_map(
        &self,
        argument: &Value,
        path: &str,
        argument_path: &str,
    ) -> Result<StrExpr, TemplateError> {
        let args = Self::arguments(
            argument,
            argument_path,
            "Fn::FindInMap",
            "map name, top-level key, second-level key",
        )?;
        let map_path = element(argument_path, 0);
        let map = self.string(&args[0], &map_path)?;
        // A literal map name can be checked now; a computed one only at evaluation. Keys are
        // always left to evaluation: the documentation treats a missing key as a provisioning
        // error, and most keys come from parameters anyway.
        if let StrExpr::Literal(name) = &map
            && !self.mappings.contains_key(name)
        {
            return Err(refuse(
                &map_path,
                format!("Fn::FindInMap refers to unknown map {name}"),
            ));
        }
        let top_key = self.string(&args[1], &element(argument_path, 1))?;
        let second_key = self.string(&args[2], &element(argument_path, 2))?;
        Ok(StrExpr::FindInMap {
            map: Box::new(map),
            top_key: Box::new(top_key),
            second_key: Box::new(second_key),
            path: path.to_owned(),
        })
    }

    /// `Fn::Sub`: `"text ${Name}"` or `["text ${Var}", {"Var": expr}]`. `${!Text}` is the
    /// CloudFormation escape for a literal `${Text}`.
    fn sub(&self, argument: &Value, path: &str) -> Result<StrExpr, TemplateError> {
        match argument {
            Value::String(text) => self.sub_text(text, &BTreeMap::new(), path),
            Value::Array(items) if items.len() == 2 => {
                let text_path = element(path, 0);
                let Value::String(text) = &items[0] else {
                    return Err(refuse(
                        &text_path,
                        format!(
                            "the Fn::Sub template must be a literal string, found {}",
                            kind(&items[0])
                        ),
                    ));
                };
                let vars_path = element(path, 1);
                let vars = match &items[1] {
                    Value::Object(object) if !looks_like_function(object) => object,
                    other => {
                        return Err(refuse(
                            &vars_path,
                            format!(
                                "the Fn::Sub variable map must be an object of names to values, \
                                 found {}",
                                if matches!(other, Value::Object(_)) {
                                    "a function call"
                                } else {
                                    kind(other)
                                }
                            ),
                        ));
                    }
                };
                let vars = sorted(vars)
                    .into_iter()
                    .map(|(name, value)| {
                        Ok((name.clone(), self.string(value, &child(&vars_path, name))?))
                    })
                    .collect::<Result<BTreeMap<_, _>, TemplateError>>()?;
                self.sub_text(text, &vars, &text_path)
            }
            Value::Array(items) => Err(refuse(
                path,
                format!(
                    "Fn::Sub expects a string or 2 arguments [template, variable map], found {} \
                     arguments",
                    items.len()
                ),
            )),
            other => Err(refuse(
                path,
                format!(
                    "Fn::Sub expects a string or an array [template, variable map], found {}",
                    kind(other)
                ),
            )),
        }
    }

    fn sub_text(
        &self,
        text: &str,
        vars: &BTreeMap<String, StrExpr>,
        path: &str,
    ) -> Result<StrExpr, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(refuse(
                    path,
                    format!("Fn::Sub template has an unterminated \"${{\" in {text:?}"),
                ));
            };
            let name = &after[..end];
            rest = &after[end + 1..];
            if let Some(escaped) = name.strip_prefix('!') {
                literal.push_str("${");
                literal.push_str(escaped);
                literal.push('}');
                continue;
            }
            // Variables given in the map shadow parameters of the same name, as in CloudFormation.
            let expr = if let Some(var) = vars.get(name) {
                var.clone()
            } else if self.is_parameter(name) {
                StrExpr::Ref {
                    name: name.to_owned(),
                    path: path.to_owned(),
                }
            } else if name.is_empty() {
                return Err(refuse(path, "Fn::Sub template has an empty \"${}\""));
            } else {
                return Err(refuse(
                    path,
                    format!("Fn::Sub references undeclared name {name}"),
                ));
            };
            if !literal.is_empty() {
                parts.push(StrExpr::Literal(std::mem::take(&mut literal)));
            }
            parts.push(expr);
        }
        literal.push_str(rest);
        if !literal.is_empty() || parts.is_empty() {
            parts.push(StrExpr::Literal(literal));
        }
        Ok(StrExpr::Concat(parts))
    }

    /// An object that must be a plain map (`Properties`, `AttributePayload`, `OverrideSettings`,
    /// `DeviceConfiguration`): a function call there is reported as such, so that `Fn::If` gets
    /// the same "unsupported function" message wherever it appears.
    fn map<'v>(
        &self,
        value: &'v Value,
        path: &str,
        what: &str,
    ) -> Result<&'v Map<String, Value>, TemplateError> {
        match value {
            Value::Object(object) if object.len() == 1 && looks_like_function(object) => {
                // Only reached for supported functions: unsupported ones fail inside `function`.
                self.function(object, path)?;
                Err(refuse(
                    path,
                    format!(
                        "{what} must be a map, not the result of {}",
                        function_name(object)
                    ),
                ))
            }
            other => as_object(other, path, what),
        }
    }

    fn resources(&self, value: &Value) -> Result<Resources, TemplateError> {
        let section = self.map(value, "Resources", "the Resources section")?;
        let mut resources = Resources::default();
        let mut thing_name: Option<&str> = None;
        let mut certificate_name: Option<&str> = None;
        for (logical_name, resource) in sorted(section) {
            let path = child("Resources", logical_name);
            let resource = as_object(resource, &path, "a resource")?;
            for (key, _) in sorted(resource) {
                if !matches!(key.as_str(), "Type" | "Properties" | "OverrideSettings") {
                    return Err(refuse(
                        &child(&path, key),
                        format!(
                            "unsupported resource attribute {key} (resources may only have Type, \
                             Properties and OverrideSettings)"
                        ),
                    ));
                }
            }
            let resource_type = match resource.get("Type") {
                Some(Value::String(t)) => t.as_str(),
                Some(other) => {
                    return Err(refuse(
                        &child(&path, "Type"),
                        format!("the resource type must be a string, found {}", kind(other)),
                    ));
                }
                None => return Err(refuse(&path, "missing Type")),
            };
            let properties_path = child(&path, "Properties");
            let properties = match resource.get("Properties") {
                Some(properties) => self.map(properties, &properties_path, "Properties")?,
                None => return Err(refuse(&path, "missing Properties")),
            };
            let overrides = resource
                .get("OverrideSettings")
                .map(|value| {
                    let overrides_path = child(&path, "OverrideSettings");
                    self.map(value, &overrides_path, "OverrideSettings")
                        .map(|map| (map, overrides_path))
                })
                .transpose()?;
            match resource_type {
                THING_TYPE => {
                    if let Some(first) = thing_name {
                        return Err(refuse(
                            &path,
                            format!(
                                "a template may declare at most one {THING_TYPE} (already declared \
                                 as {first})"
                            ),
                        ));
                    }
                    thing_name = Some(logical_name);
                    resources.thing = Some(self.thing(properties, &properties_path, overrides)?);
                }
                CERTIFICATE_TYPE => {
                    if let Some(first) = certificate_name {
                        return Err(refuse(
                            &path,
                            format!(
                                "a template may declare at most one {CERTIFICATE_TYPE} (already \
                                 declared as {first})"
                            ),
                        ));
                    }
                    certificate_name = Some(logical_name);
                    resources.certificate =
                        Some(self.certificate(properties, &properties_path, overrides)?);
                }
                POLICY_TYPE => {
                    if let Some((_, overrides_path)) = overrides {
                        return Err(refuse(
                            &overrides_path,
                            format!("OverrideSettings are not available for {POLICY_TYPE}"),
                        ));
                    }
                    resources
                        .policies
                        .push(self.policy(properties, &properties_path)?);
                }
                other => {
                    return Err(refuse(
                        &child(&path, "Type"),
                        format!(
                            "unsupported resource type {other} (supported: {THING_TYPE}, \
                             {CERTIFICATE_TYPE}, {POLICY_TYPE})"
                        ),
                    ));
                }
            }
        }
        Ok(resources)
    }

    fn thing(
        &self,
        properties: &Map<String, Value>,
        path: &str,
        overrides: Option<(&Map<String, Value>, String)>,
    ) -> Result<ThingDef, TemplateError> {
        let mut name = None;
        let mut attributes = None;
        let mut thing_type = None;
        let mut groups = None;
        let mut billing_group = None;
        for (key, value) in sorted(properties) {
            let property_path = child(path, key);
            match key.as_str() {
                "ThingName" => name = Some(self.string(value, &property_path)?),
                "AttributePayload" => {
                    let payload = self.map(value, &property_path, "AttributePayload")?;
                    let mut map = BTreeMap::new();
                    for (attribute, value) in sorted(payload) {
                        let expr = self.string(value, &child(&property_path, attribute))?;
                        map.insert(attribute.clone(), expr);
                    }
                    attributes = Some(map);
                }
                "ThingTypeName" => thing_type = Some(self.string(value, &property_path)?),
                "ThingGroups" => groups = Some(self.list(value, &property_path)?),
                "BillingGroup" => billing_group = Some(self.string(value, &property_path)?),
                // Software package versions are documented for thing resources, but nothing in
                // this fake models software packages, so the value is accepted and left alone.
                "PackageVersions" => {}
                other => return Err(unsupported_property(&property_path, other, THING_TYPE)),
            }
        }
        let name = name.ok_or_else(|| refuse(path, format!("{THING_TYPE} needs ThingName")))?;

        let mut attributes_override = None;
        let mut thing_type_override = None;
        let mut groups_override = None;
        if let Some((overrides, overrides_path)) = overrides {
            for (key, value) in sorted(overrides) {
                let setting_path = child(&overrides_path, key);
                // The documentation's prose spells the keys in upper snake case while every
                // example uses the property names; both are documented, so both are accepted.
                let (slot, merge_allowed) = match key.as_str() {
                    "AttributePayload" | "ATTRIBUTE_PAYLOAD" => (&mut attributes_override, true),
                    "ThingTypeName" | "THING_TYPE_NAME" => (&mut thing_type_override, false),
                    "ThingGroups" | "THING_GROUPS" => (&mut groups_override, true),
                    other => {
                        return Err(refuse(
                            &setting_path,
                            format!(
                                "unsupported override key {other} for {THING_TYPE} (allowed: \
                                 AttributePayload, ThingTypeName, ThingGroups)"
                            ),
                        ));
                    }
                };
                if slot.is_some() {
                    return Err(refuse(
                        &setting_path,
                        "the same property is given twice in OverrideSettings",
                    ));
                }
                *slot = Some(parse_override(value, &setting_path, merge_allowed)?);
            }
        }

        Ok(ThingDef {
            name,
            name_path: child(path, "ThingName"),
            attributes,
            thing_type,
            groups,
            billing_group,
            attributes_override,
            thing_type_override,
            groups_override,
        })
    }

    fn certificate(
        &self,
        properties: &Map<String, Value>,
        path: &str,
        overrides: Option<(&Map<String, Value>, String)>,
    ) -> Result<CertificateDef, TemplateError> {
        let mut id = None;
        let mut status = None;
        for (key, value) in sorted(properties) {
            let property_path = child(path, key);
            match key.as_str() {
                "CertificateId" => id = Some(self.string(value, &property_path)?),
                "Status" => {
                    let expr = self.string(value, &property_path)?;
                    if let StrExpr::Literal(literal) = &expr {
                        parse_status(literal).ok_or_else(|| {
                            refuse(&property_path, invalid_status_message(literal))
                        })?;
                    }
                    status = Some((expr, property_path));
                }
                "CertificateSigningRequest" | "CertificatePem" | "CACertificatePem" => {
                    return Err(refuse(
                        &property_path,
                        format!(
                            "fleet provisioning templates may only use CertificateId to identify \
                             the certificate, not {key}"
                        ),
                    ));
                }
                other => {
                    return Err(unsupported_property(
                        &property_path,
                        other,
                        CERTIFICATE_TYPE,
                    ));
                }
            }
        }
        let id = id.ok_or_else(|| {
            refuse(
                path,
                format!(
                    "{CERTIFICATE_TYPE} needs CertificateId (normally {{\"Ref\": \
                     \"{CERTIFICATE_ID_PARAMETER}\"}})"
                ),
            )
        })?;

        let mut status_override = None;
        if let Some((overrides, overrides_path)) = overrides {
            for (key, value) in sorted(overrides) {
                let setting_path = child(&overrides_path, key);
                if key != "Status" {
                    return Err(refuse(
                        &setting_path,
                        format!(
                            "unsupported override key {key} for {CERTIFICATE_TYPE} (allowed: \
                             Status)"
                        ),
                    ));
                }
                status_override = Some(parse_override(value, &setting_path, false)?);
            }
        }
        Ok(CertificateDef {
            id,
            status,
            status_override,
        })
    }

    fn policy(
        &self,
        properties: &Map<String, Value>,
        path: &str,
    ) -> Result<PolicyDef, TemplateError> {
        let mut definition = None;
        for (key, value) in sorted(properties) {
            let property_path = child(path, key);
            let parsed = match key.as_str() {
                "PolicyName" => PolicyDef::Existing(self.string(value, &property_path)?),
                "PolicyDocument" => self.policy_document(value, &property_path)?,
                other => return Err(unsupported_property(&property_path, other, POLICY_TYPE)),
            };
            if definition.is_some() {
                return Err(refuse(
                    path,
                    format!(
                        "{POLICY_TYPE} takes exactly one of PolicyName or PolicyDocument, not both"
                    ),
                ));
            }
            definition = Some(parsed);
        }
        definition.ok_or_else(|| {
            refuse(
                path,
                format!("{POLICY_TYPE} needs exactly one of PolicyName or PolicyDocument"),
            )
        })
    }

    fn policy_document(&self, value: &Value, path: &str) -> Result<PolicyDef, TemplateError> {
        match value {
            Value::String(text) => {
                check_policy_text(text).map_err(|message| refuse(path, message))?;
                Ok(PolicyDef::InlineText {
                    document: StrExpr::Literal(text.clone()),
                    path: path.to_owned(),
                })
            }
            // A single-key object naming a function is a computed document string (say,
            // Fn::Sub over an escaped policy); any other object is the document itself.
            Value::Object(object) if is_document_function(object) => {
                let document = self.string(value, path)?;
                Ok(PolicyDef::InlineText {
                    document,
                    path: path.to_owned(),
                })
            }
            Value::Object(_) => Ok(PolicyDef::InlineObject(self.json_node(value, path)?)),
            other => Err(refuse(
                path,
                format!(
                    "PolicyDocument must be a JSON object or a string holding one, found {}",
                    kind(other)
                ),
            )),
        }
    }

    /// Walks a policy document object. Intrinsic functions are allowed anywhere in it (the
    /// documentation allows them in every section but Mappings), for example to build a resource
    /// ARN from a parameter.
    fn json_node(&self, value: &Value, path: &str) -> Result<JsonNode, TemplateError> {
        match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.json_node(item, &element(path, i)))
                .collect::<Result<Vec<_>, _>>()
                .map(JsonNode::Array),
            Value::Object(object) if is_document_function(object) => {
                Ok(match self.function(object, path)? {
                    Typed::Str(expr) => JsonNode::Str(expr),
                    Typed::List(list) => JsonNode::List(list),
                })
            }
            Value::Object(object) => sorted(object)
                .into_iter()
                .map(|(key, value)| Ok((key.clone(), self.json_node(value, &child(path, key))?)))
                .collect::<Result<Vec<_>, TemplateError>>()
                .map(JsonNode::Object),
            other => Ok(JsonNode::Literal(other.clone())),
        }
    }

    /// `DeviceConfiguration` is returned to the device as a flat map of strings (the SDKs model
    /// it as `Dict[str, str]`), and the documentation rules out nested objects.
    fn device_configuration(
        &self,
        value: &Value,
    ) -> Result<BTreeMap<String, StrExpr>, TemplateError> {
        let path = "DeviceConfiguration";
        let section = self.map(value, path, "the DeviceConfiguration section")?;
        let mut configuration = BTreeMap::new();
        for (key, value) in sorted(section) {
            let entry_path = child(path, key);
            if let Value::Object(object) = value
                && !looks_like_function(object)
            {
                return Err(refuse(
                    &entry_path,
                    "nested objects are not supported in DeviceConfiguration (values must be \
                     strings)",
                ));
            }
            configuration.insert(key.clone(), self.string(value, &entry_path)?);
        }
        Ok(configuration)
    }
}

/// Inside a policy document `Condition` is an ordinary IAM statement key, so only `Ref` and
/// `Fn::...` mark a function call there.
fn is_document_function(object: &Map<String, Value>) -> bool {
    object
        .keys()
        .any(|key| key == "Ref" || key.starts_with("Fn::"))
}

/// The function key of an object already known to look like a function call.
fn function_name(object: &Map<String, Value>) -> &str {
    object
        .keys()
        .map(String::as_str)
        .find(|key| is_function_key(key))
        .unwrap_or("a function")
}

fn unsupported_property(path: &str, property: &str, resource_type: &str) -> TemplateError {
    refuse(
        path,
        format!("unsupported property {property} for {resource_type}"),
    )
}

fn parse_override(
    value: &Value,
    path: &str,
    merge_allowed: bool,
) -> Result<Override, TemplateError> {
    let Value::String(text) = value else {
        return Err(refuse(
            path,
            format!(
                "an override setting must be one of DO_NOTHING, REPLACE, FAIL, MERGE, found {}",
                kind(value)
            ),
        ));
    };
    match text.as_str() {
        "DO_NOTHING" => Ok(Override::DoNothing),
        "REPLACE" => Ok(Override::Replace),
        "FAIL" => Ok(Override::Fail),
        "MERGE" if merge_allowed => Ok(Override::Merge),
        "MERGE" => Err(refuse(
            path,
            "MERGE is only allowed for the thing's AttributePayload and ThingGroups",
        )),
        other => Err(refuse(
            path,
            format!(
                "unsupported override setting {other:?} (allowed: DO_NOTHING, REPLACE, FAIL, and \
                 MERGE for AttributePayload and ThingGroups)"
            ),
        )),
    }
}

/// `Some(true)` for ACTIVE, `Some(false)` for INACTIVE. AWS examples also write `"Active"`, so
/// the comparison ignores case.
fn parse_status(status: &str) -> Option<bool> {
    if status.eq_ignore_ascii_case("ACTIVE") {
        Some(true)
    } else if status.eq_ignore_ascii_case("INACTIVE") {
        Some(false)
    } else {
        None
    }
}

fn invalid_status_message(status: &str) -> String {
    format!("unsupported certificate Status {status:?} (allowed: ACTIVE, INACTIVE)")
}

/// Checks that a policy document given as a string holds a JSON object.
fn check_policy_text(text: &str) -> Result<(), String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(_)) => Ok(()),
        Ok(other) => Err(format!(
            "PolicyDocument must hold a JSON object, found {}",
            kind(&other)
        )),
        Err(e) => Err(format!("parse PolicyDocument as JSON: {e}")),
    }
}

/// The name AWS gives a policy created from an inline document is "a hash of the document"; the
/// documentation's sample shows 40 upper-case hex digits, which looks like SHA-1. This crate has
/// only sha2 available, so the name is the upper-case hex SHA-256 of the document text, cut to
/// 40 digits: same shape, deterministic, and identical documents share one policy.
fn inline_policy_name(document: &str) -> String {
    let mut name = hex::encode_upper(Sha256::digest(document.as_bytes()));
    name.truncate(40);
    name
}

/// ThingName as the IoT service model constrains it: 1–128 of `[a-zA-Z0-9:_-]`. Checked here
/// because the evaluated name goes back to the device, which uses it as its MQTT client id and in
/// topic names.
fn is_valid_thing_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

fn fail(path: &str, message: impl Into<String>) -> EvalError {
    EvalError {
        path: path.to_owned(),
        message: message.into(),
    }
}

struct Evaluator<'a> {
    template: &'a Template,
    parameters: &'a BTreeMap<String, String>,
    certificate_id: &'a str,
}

impl Evaluator<'_> {
    fn string(&self, expr: &StrExpr) -> Result<String, EvalError> {
        match expr {
            StrExpr::Literal(s) => Ok(s.clone()),
            StrExpr::Ref { name, path } => self.parameter(name, path),
            StrExpr::Join { delimiter, list } => Ok(self.list(list)?.join(delimiter)),
            StrExpr::Select { index, list, path } => {
                let index = match index.as_ref() {
                    IndexExpr::Fixed(index) => *index,
                    IndexExpr::Computed(expr) => {
                        let text = self.string(expr)?;
                        text.parse::<usize>().map_err(|_| {
                            fail(
                                path,
                                format!(
                                    "the Fn::Select index must be a non-negative integer, got \
                                     {text:?}"
                                ),
                            )
                        })?
                    }
                };
                let items = self.list(list)?;
                let count = items.len();
                items.into_iter().nth(index).ok_or_else(|| {
                    fail(
                        path,
                        format!(
                            "Fn::Select index {index} is out of range for a list of {count} \
                             item(s)"
                        ),
                    )
                })
            }
            StrExpr::FindInMap {
                map,
                top_key,
                second_key,
                path,
            } => {
                let map_name = self.string(map)?;
                let top = self.string(top_key)?;
                let second = self.string(second_key)?;
                let map = self.template.mappings.get(&map_name).ok_or_else(|| {
                    fail(path, format!("Fn::FindInMap: there is no map {map_name:?}"))
                })?;
                let entry = map.get(&top).ok_or_else(|| {
                    fail(
                        path,
                        format!("Fn::FindInMap: map {map_name} has no top-level key {top:?}"),
                    )
                })?;
                entry.get(&second).cloned().ok_or_else(|| {
                    fail(
                        path,
                        format!(
                            "Fn::FindInMap: map {map_name} has no second-level key {second:?} \
                             under {top:?}"
                        ),
                    )
                })
            }
            StrExpr::Concat(parts) => parts.iter().map(|part| self.string(part)).collect(),
        }
    }

    fn list(&self, expr: &ListExpr) -> Result<Vec<String>, EvalError> {
        match expr {
            ListExpr::Items(items) => items.iter().map(|item| self.string(item)).collect(),
            ListExpr::Split { delimiter, source } => Ok(self
                .string(source)?
                .split(delimiter.as_str())
                .map(str::to_owned)
                .collect()),
        }
    }

    /// Request value, then default (reference §3.2: device values merged with hook overrides come
    /// first, the default last).
    fn parameter(&self, name: &str, path: &str) -> Result<String, EvalError> {
        if name == CERTIFICATE_ID_PARAMETER {
            return Ok(self.certificate_id.to_owned());
        }
        if let Some(value) = self.parameters.get(name) {
            return Ok(value.clone());
        }
        match self.template.parameters.get(name) {
            Some(Some(default)) => Ok(default.clone()),
            _ => Err(fail(
                path,
                format!("parameter {name} has no value in the request and no default"),
            )),
        }
    }

    fn optional(&self, expr: Option<&StrExpr>) -> Result<Option<String>, EvalError> {
        expr.map(|expr| self.string(expr)).transpose()
    }

    fn thing(&self, def: &ThingDef) -> Result<ThingPlan, EvalError> {
        let name = self.string(&def.name)?;
        if !is_valid_thing_name(&name) {
            return Err(fail(
                &def.name_path,
                format!(
                    "ThingName evaluates to {name:?}, which is not a valid thing name (1-128 \
                     characters from a-z, A-Z, 0-9, ':', '_' and '-')"
                ),
            ));
        }
        let attributes = def
            .attributes
            .as_ref()
            .map(|attributes| {
                attributes
                    .iter()
                    .map(|(key, expr)| Ok((key.clone(), self.string(expr)?)))
                    .collect::<Result<BTreeMap<_, _>, EvalError>>()
            })
            .transpose()?;
        Ok(ThingPlan {
            name,
            attributes,
            thing_type: self.optional(def.thing_type.as_ref())?,
            groups: def
                .groups
                .as_ref()
                .map(|list| self.list(list))
                .transpose()?,
            billing_group: self.optional(def.billing_group.as_ref())?,
            attributes_override: def.attributes_override,
            thing_type_override: def.thing_type_override,
            groups_override: def.groups_override,
        })
    }

    fn certificate(&self, def: &CertificateDef) -> Result<CertificatePlan, EvalError> {
        let certificate_id = self.string(&def.id)?;
        let active = match &def.status {
            // The documented default status is ACTIVE.
            None => true,
            Some((expr, path)) => {
                let status = self.string(expr)?;
                parse_status(&status).ok_or_else(|| fail(path, invalid_status_message(&status)))?
            }
        };
        Ok(CertificatePlan {
            certificate_id,
            active,
            status_override: def.status_override,
        })
    }

    fn policy(&self, def: &PolicyDef) -> Result<PolicyPlan, EvalError> {
        match def {
            PolicyDef::Existing(name) => Ok(PolicyPlan::Existing {
                name: self.string(name)?,
            }),
            PolicyDef::InlineObject(node) => {
                let document = self.json(node)?.to_string();
                Ok(PolicyPlan::Inline {
                    name: inline_policy_name(&document),
                    document,
                })
            }
            PolicyDef::InlineText { document, path } => {
                // A literal was checked at parse time; a computed one can only be checked now.
                let document = self.string(document)?;
                check_policy_text(&document).map_err(|message| fail(path, message))?;
                Ok(PolicyPlan::Inline {
                    name: inline_policy_name(&document),
                    document,
                })
            }
        }
    }

    fn json(&self, node: &JsonNode) -> Result<Value, EvalError> {
        Ok(match node {
            JsonNode::Literal(value) => value.clone(),
            JsonNode::Str(expr) => Value::String(self.string(expr)?),
            JsonNode::List(list) => {
                Value::Array(self.list(list)?.into_iter().map(Value::String).collect())
            }
            JsonNode::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.json(item))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            JsonNode::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(key, value)| Ok((key.clone(), self.json(value)?)))
                    .collect::<Result<Map<_, _>, EvalError>>()?,
            ),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A certificate id as the create calls produce it: 64 lower-case hex digits.
    const CERT: &str = "9f1c6e0b8a5d4c3b2a19f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3";

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn thing(name: &str) -> ThingPlan {
        ThingPlan {
            name: name.to_owned(),
            attributes: None,
            thing_type: None,
            groups: None,
            billing_group: None,
            attributes_override: None,
            thing_type_override: None,
            groups_override: None,
        }
    }

    fn certificate(active: bool) -> CertificatePlan {
        CertificatePlan {
            certificate_id: CERT.to_owned(),
            active,
            status_override: None,
        }
    }

    fn existing(name: &str) -> PolicyPlan {
        PolicyPlan::Existing {
            name: name.to_owned(),
        }
    }

    fn inline(name: &str, document: &str) -> PolicyPlan {
        PolicyPlan::Inline {
            name: name.to_owned(),
            document: document.to_owned(),
        }
    }

    /// The composed example of reference §3.2, verbatim.
    const COMPOSED: &str = r#"{
      "Parameters": {
        "SerialNumber": { "Type": "String" },
        "Region": { "Type": "String", "Default": "eu" },
        "AWS::IoT::Certificate::Id": { "Type": "String" }
      },
      "Mappings": { "Endpoints": { "eu": { "Ota": "https://ota.eu.example" } } },
      "Resources": {
        "thing": {
          "Type": "AWS::IoT::Thing",
          "Properties": {
            "ThingName": { "Fn::Join": ["", ["dev-", { "Ref": "SerialNumber" }]] },
            "AttributePayload": { "serial": { "Ref": "SerialNumber" } },
            "ThingGroups": ["fleet"]
          },
          "OverrideSettings": { "AttributePayload": "MERGE", "ThingGroups": "DO_NOTHING", "ThingTypeName": "REPLACE" }
        },
        "certificate": {
          "Type": "AWS::IoT::Certificate",
          "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "ACTIVE" }
        },
        "policy": { "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "DevicePolicy" } }
      },
      "DeviceConfiguration": { "OtaUrl": { "Fn::FindInMap": ["Endpoints", { "Ref": "Region" }, "Ota"] } }
    }"#;

    /// In the style of the AWS embedded C demo template: the pseudo parameter is declared, the
    /// status is written "Active", attributes and groups are empty.
    const EMBEDDED_DEMO: &str = r#"{
      "Parameters": {
        "SerialNumber": { "Type": "String" },
        "AWS::IoT::Certificate::Id": { "Type": "String" }
      },
      "Resources": {
        "certificate": {
          "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "Active" },
          "Type": "AWS::IoT::Certificate"
        },
        "policy": { "Properties": { "PolicyName": "FleetDemoDevicePolicy" }, "Type": "AWS::IoT::Policy" },
        "thing": {
          "OverrideSettings": { "AttributePayload": "MERGE", "ThingGroups": "DO_NOTHING", "ThingTypeName": "REPLACE" },
          "Properties": {
            "AttributePayload": {},
            "ThingGroups": [],
            "ThingName": { "Fn::Join": ["", ["fp_demo_", { "Ref": "SerialNumber" }]] }
          },
          "Type": "AWS::IoT::Thing"
        }
      },
      "DeviceConfiguration": { "Foo": "Bar" }
    }"#;

    /// In the style of the developer guide's fleet example: the pseudo parameter is used without
    /// being declared, and the policy document is an escaped JSON string.
    const GUIDE_STYLE: &str = r#"{
      "Parameters": {
        "ThingName": { "Type": "String" },
        "SerialNumber": { "Type": "String" },
        "DeviceLocation": { "Type": "String" }
      },
      "Mappings": { "LocationTable": { "Seattle": { "LocationUrl": "https://example.aws" } } },
      "Resources": {
        "thing": {
          "Type": "AWS::IoT::Thing",
          "Properties": {
            "ThingName": { "Ref": "ThingName" },
            "AttributePayload": { "version": "v1", "serialNumber": { "Ref": "SerialNumber" } },
            "ThingTypeName": "lightBulb-versionA",
            "ThingGroups": ["v1-lightbulbs", { "Ref": "DeviceLocation" }]
          },
          "OverrideSettings": { "AttributePayload": "MERGE", "ThingTypeName": "REPLACE", "ThingGroups": "DO_NOTHING" }
        },
        "certificate": {
          "Type": "AWS::IoT::Certificate",
          "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "Active" }
        },
        "policy": {
          "Type": "AWS::IoT::Policy",
          "Properties": {
            "PolicyDocument": "{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\":[\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/foo/bar\"] }] }"
          }
        }
      },
      "DeviceConfiguration": {
        "FallbackUrl": "https://www.example.com/test-site",
        "LocationUrl": { "Fn::FindInMap": ["LocationTable", { "Ref": "DeviceLocation" }, "LocationUrl"] }
      }
    }"#;

    const GUIDE_POLICY: &str = r#"{ "Version": "2012-10-17", "Statement": [{ "Effect": "Allow", "Action":["iot:Publish"], "Resource": ["arn:aws:iot:us-east-1:123456789012:topic/foo/bar"] }] }"#;

    const SUB_STRING: &str = r#"{
      "Parameters": { "SerialNumber": { "Type": "String" } },
      "Resources": {
        "thing": { "Type": "AWS::IoT::Thing", "Properties": { "ThingName": { "Fn::Sub": "dev-${SerialNumber}" } } }
      },
      "DeviceConfiguration": {
        "Cert": { "Fn::Sub": "cert/${AWS::IoT::Certificate::Id}" },
        "Escaped": { "Fn::Sub": "${!NotAParam}-$x-{y}-${SerialNumber}${SerialNumber}" },
        "Plain": { "Fn::Sub": "no references" },
        "Empty": { "Fn::Sub": "" }
      }
    }"#;

    const SUB_VARIABLES: &str = r#"{
      "Parameters": { "SerialNumber": { "Type": "String" }, "Product": { "Type": "String" } },
      "Resources": {
        "thing": {
          "Type": "AWS::IoT::Thing",
          "Properties": {
            "ThingName": { "Fn::Sub": ["${Model}-${SerialNumber}", {
              "Model": { "Fn::Select": [0, { "Fn::Split": ["/", { "Ref": "Product" }] }] },
              "Unused": "never evaluated"
            }] }
          }
        }
      },
      "DeviceConfiguration": {
        "Shadowed": { "Fn::Sub": ["${SerialNumber}/${Version}", { "SerialNumber": "from-map", "Version": { "Fn::Select": ["1", { "Fn::Split": ["/", { "Ref": "Product" }] }] } }] }
      }
    }"#;

    const SELECT_SPLIT: &str = r#"{
      "Parameters": { "Csv": { "Type": "String" }, "Idx": { "Type": "String", "Default": "1" } },
      "Resources": {
        "thing": {
          "Type": "AWS::IoT::Thing",
          "Properties": {
            "ThingName": "splitter",
            "ThingGroups": { "Fn::Split": [",", { "Ref": "Csv" }] },
            "ThingTypeName": { "Fn::Select": ["1", { "Fn::Split": [",", { "Ref": "Csv" }] }] },
            "BillingGroup": { "Fn::Select": [2, { "Fn::Split": [",", { "Ref": "Csv" }] }] }
          }
        }
      },
      "DeviceConfiguration": {
        "Computed": { "Fn::Select": [{ "Ref": "Idx" }, ["x", { "Ref": "Csv" }]] },
        "Rejoined": { "Fn::Join": ["+", { "Fn::Split": [",", { "Ref": "Csv" }] }] },
        "EmptyJoin": { "Fn::Join": ["", []] },
        "MultiCharDelimiter": { "Fn::Select": [1, { "Fn::Split": ["::", "a::b::c"] }] }
      }
    }"#;

    const FIND_IN_MAP: &str = r#"{
      "Parameters": {
        "Region": { "Type": "String", "Default": "eu" },
        "Tier": { "Type": "String", "Default": "basic" },
        "MapName": { "Type": "String", "Default": "Endpoints" }
      },
      "Mappings": {
        "Endpoints": {
          "eu": { "basic": "https://eu.basic", "pro": "https://eu.pro" },
          "us": { "basic": "https://us.basic" }
        },
        "Tiers": { "names": { "basic": "pro" } }
      },
      "Resources": {},
      "DeviceConfiguration": {
        "Url": { "Fn::FindInMap": ["Endpoints", { "Ref": "Region" }, { "Ref": "Tier" }] },
        "Computed": { "Fn::FindInMap": [{ "Ref": "MapName" }, "eu", { "Fn::FindInMap": ["Tiers", "names", "basic"] }] }
      }
    }"#;

    const POLICY_OBJECT: &str = r#"{
      "Parameters": { "ThingName": { "Type": "String" }, "Topics": { "Type": "String" } },
      "Resources": {
        "policy": {
          "Type": "AWS::IoT::Policy",
          "Properties": {
            "PolicyDocument": {
              "Version": "2012-10-17",
              "Statement": [
                {
                  "Effect": "Allow",
                  "Action": ["iot:Connect"],
                  "Resource": { "Fn::Join": ["", ["arn:aws:iot:eu-west-1:123456789012:client/", { "Ref": "ThingName" }]] }
                },
                {
                  "Effect": "Allow",
                  "Action": "iot:Publish",
                  "Resource": { "Fn::Split": [",", { "Ref": "Topics" }] },
                  "Condition": { "NumericLessThan": { "aws:EpochTime": 1893456000 } }
                }
              ]
            }
          }
        }
      }
    }"#;

    /// Keys come out sorted and compact, whatever order the template wrote them in.
    const POLICY_OBJECT_DOCUMENT: &str = r#"{"Statement":[{"Action":["iot:Connect"],"Effect":"Allow","Resource":"arn:aws:iot:eu-west-1:123456789012:client/dev1"},{"Action":"iot:Publish","Condition":{"NumericLessThan":{"aws:EpochTime":1893456000}},"Effect":"Allow","Resource":["arn:t/a","arn:t/b"]}],"Version":"2012-10-17"}"#;

    const POLICIES: &str = r#"{
      "Parameters": { "ThingName": { "Type": "String" }, "Existing": { "Type": "String", "Default": "Shared" } },
      "Resources": {
        "b_existing": { "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": { "Ref": "Existing" } } },
        "a_computed": {
          "Type": "AWS::IoT::Policy",
          "Properties": {
            "PolicyDocument": { "Fn::Sub": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"iot:Connect\",\"Resource\":\"arn:aws:iot:*:*:client/${ThingName}\"}]}" }
          }
        },
        "c_literal": { "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "Literal" } }
      }
    }"#;

    const POLICIES_COMPUTED_DOCUMENT: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/dev1"}]}"#;

    const STATUS_REF: &str = r#"{
      "Parameters": { "Status": { "Type": "String", "Default": "inactive" } },
      "Resources": {
        "certificate": {
          "Type": "AWS::IoT::Certificate",
          "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": { "Ref": "Status" } },
          "OverrideSettings": { "Status": "FAIL" }
        }
      }
    }"#;

    const CERTIFICATE_ONLY: &str = r#"{
      "Resources": {
        "cert": { "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" } } }
      },
      "DeviceConfiguration": {}
    }"#;

    const ALIASES: &str = r#"{
      "Resources": {
        "thing": {
          "Type": "AWS::IoT::Thing",
          "Properties": {
            "ThingName": "fixed:name_1",
            "BillingGroup": "billing",
            "PackageVersions": { "firmware": { "versionName": "1.0" } }
          },
          "OverrideSettings": { "ATTRIBUTE_PAYLOAD": "REPLACE", "THING_GROUPS": "FAIL", "THING_TYPE_NAME": "DO_NOTHING" }
        },
        "cert": {
          "Type": "AWS::IoT::Certificate",
          "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "INACTIVE" },
          "OverrideSettings": { "Status": "DO_NOTHING" }
        }
      }
    }"#;

    const PSEUDO_WITH_DEFAULT: &str = r#"{
      "Parameters": {
        "SerialNumber": { "Type": "String" },
        "AWS::IoT::Certificate::Id": { "Type": "String", "Default": "not-the-certificate" }
      },
      "Resources": {
        "thing": { "Type": "AWS::IoT::Thing", "Properties": { "ThingName": { "Ref": "SerialNumber" } } },
        "cert": { "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" } } }
      },
      "DeviceConfiguration": { "Id": { "Ref": "AWS::IoT::Certificate::Id" } }
    }"#;

    struct Case {
        name: &'static str,
        body: &'static str,
        parameters: BTreeMap<String, String>,
        expected: Plan,
    }

    fn evaluation_cases() -> Vec<Case> {
        vec![
            Case {
                name: "composed example of reference 3.2, default region",
                body: COMPOSED,
                parameters: params(&[("SerialNumber", "SN-0001")]),
                expected: Plan {
                    thing: Some(ThingPlan {
                        attributes: Some(params(&[("serial", "SN-0001")])),
                        groups: Some(strings(&["fleet"])),
                        attributes_override: Some(Override::Merge),
                        thing_type_override: Some(Override::Replace),
                        groups_override: Some(Override::DoNothing),
                        ..thing("dev-SN-0001")
                    }),
                    certificate: Some(certificate(true)),
                    policies: vec![existing("DevicePolicy")],
                    device_configuration: params(&[("OtaUrl", "https://ota.eu.example")]),
                },
            },
            Case {
                name: "embedded demo style, pseudo parameter declared",
                body: EMBEDDED_DEMO,
                parameters: params(&[("SerialNumber", "0123")]),
                expected: Plan {
                    thing: Some(ThingPlan {
                        attributes: Some(BTreeMap::new()),
                        groups: Some(Vec::new()),
                        attributes_override: Some(Override::Merge),
                        thing_type_override: Some(Override::Replace),
                        groups_override: Some(Override::DoNothing),
                        ..thing("fp_demo_0123")
                    }),
                    certificate: Some(certificate(true)),
                    policies: vec![existing("FleetDemoDevicePolicy")],
                    device_configuration: params(&[("Foo", "Bar")]),
                },
            },
            Case {
                name: "developer guide style, pseudo parameter undeclared, policy as string",
                body: GUIDE_STYLE,
                parameters: params(&[
                    ("ThingName", "bulb-42"),
                    ("SerialNumber", "SN42"),
                    ("DeviceLocation", "Seattle"),
                ]),
                expected: Plan {
                    thing: Some(ThingPlan {
                        attributes: Some(params(&[("serialNumber", "SN42"), ("version", "v1")])),
                        thing_type: Some("lightBulb-versionA".to_owned()),
                        groups: Some(strings(&["v1-lightbulbs", "Seattle"])),
                        attributes_override: Some(Override::Merge),
                        thing_type_override: Some(Override::Replace),
                        groups_override: Some(Override::DoNothing),
                        ..thing("bulb-42")
                    }),
                    certificate: Some(certificate(true)),
                    policies: vec![inline(
                        "7A9846AC0719DCAA92632014A6107805DD9EF561",
                        GUIDE_POLICY,
                    )],
                    device_configuration: params(&[
                        ("FallbackUrl", "https://www.example.com/test-site"),
                        ("LocationUrl", "https://example.aws"),
                    ]),
                },
            },
            Case {
                name: "Fn::Sub string form, escapes and the pseudo parameter",
                body: SUB_STRING,
                parameters: params(&[("SerialNumber", "SN1")]),
                expected: Plan {
                    thing: Some(thing("dev-SN1")),
                    device_configuration: params(&[
                        ("Cert", &format!("cert/{CERT}")),
                        ("Escaped", "${NotAParam}-$x-{y}-SN1SN1"),
                        ("Plain", "no references"),
                        ("Empty", ""),
                    ]),
                    ..Plan::default()
                },
            },
            Case {
                name: "Fn::Sub with a variable map, variables shadow parameters",
                body: SUB_VARIABLES,
                parameters: params(&[("SerialNumber", "SN1"), ("Product", "lamp/v2")]),
                expected: Plan {
                    thing: Some(thing("lamp-SN1")),
                    device_configuration: params(&[("Shadowed", "from-map/v2")]),
                    ..Plan::default()
                },
            },
            Case {
                name: "Fn::Select on Fn::Split, index as string, number and Ref",
                body: SELECT_SPLIT,
                parameters: params(&[("Csv", "a,b,c")]),
                expected: Plan {
                    thing: Some(ThingPlan {
                        groups: Some(strings(&["a", "b", "c"])),
                        thing_type: Some("b".to_owned()),
                        billing_group: Some("c".to_owned()),
                        ..thing("splitter")
                    }),
                    device_configuration: params(&[
                        ("Computed", "a,b,c"),
                        ("Rejoined", "a+b+c"),
                        ("EmptyJoin", ""),
                        ("MultiCharDelimiter", "b"),
                    ]),
                    ..Plan::default()
                },
            },
            Case {
                name: "Fn::Select with a request value for the index parameter",
                body: SELECT_SPLIT,
                parameters: params(&[("Csv", "p,q,r"), ("Idx", "0")]),
                expected: Plan {
                    thing: Some(ThingPlan {
                        groups: Some(strings(&["p", "q", "r"])),
                        thing_type: Some("q".to_owned()),
                        billing_group: Some("r".to_owned()),
                        ..thing("splitter")
                    }),
                    device_configuration: params(&[
                        ("Computed", "x"),
                        ("Rejoined", "p+q+r"),
                        ("EmptyJoin", ""),
                        ("MultiCharDelimiter", "b"),
                    ]),
                    ..Plan::default()
                },
            },
            Case {
                name: "Fn::FindInMap with Ref, all defaults",
                body: FIND_IN_MAP,
                parameters: BTreeMap::new(),
                expected: Plan {
                    device_configuration: params(&[
                        ("Url", "https://eu.basic"),
                        ("Computed", "https://eu.pro"),
                    ]),
                    ..Plan::default()
                },
            },
            Case {
                name: "Fn::FindInMap with Ref, request overrides one default",
                body: FIND_IN_MAP,
                parameters: params(&[("Region", "us")]),
                expected: Plan {
                    device_configuration: params(&[
                        ("Url", "https://us.basic"),
                        ("Computed", "https://eu.pro"),
                    ]),
                    ..Plan::default()
                },
            },
            Case {
                name: "Fn::FindInMap with Ref, request overrides the other default",
                body: FIND_IN_MAP,
                parameters: params(&[("Tier", "pro")]),
                expected: Plan {
                    device_configuration: params(&[
                        ("Url", "https://eu.pro"),
                        ("Computed", "https://eu.pro"),
                    ]),
                    ..Plan::default()
                },
            },
            Case {
                name: "inline policy as an object with functions inside",
                body: POLICY_OBJECT,
                parameters: params(&[("ThingName", "dev1"), ("Topics", "arn:t/a,arn:t/b")]),
                expected: Plan {
                    policies: vec![inline(
                        "C6C84656B194A5212E984ABC8063B15199B56057",
                        POLICY_OBJECT_DOCUMENT,
                    )],
                    ..Plan::default()
                },
            },
            Case {
                name: "several policies in logical-name order, document from Fn::Sub",
                body: POLICIES,
                parameters: params(&[("ThingName", "dev1")]),
                expected: Plan {
                    policies: vec![
                        inline(
                            "9AC3D1D65BDBDE2E0A938B86AF7C42F8F7761743",
                            POLICIES_COMPUTED_DOCUMENT,
                        ),
                        existing("Shared"),
                        existing("Literal"),
                    ],
                    ..Plan::default()
                },
            },
            Case {
                name: "certificate status from a default, lower case, with an override",
                body: STATUS_REF,
                parameters: BTreeMap::new(),
                expected: Plan {
                    certificate: Some(CertificatePlan {
                        status_override: Some(Override::Fail),
                        ..certificate(false)
                    }),
                    ..Plan::default()
                },
            },
            Case {
                name: "certificate status from the request, mixed case",
                body: STATUS_REF,
                parameters: params(&[("Status", "aCtIvE")]),
                expected: Plan {
                    certificate: Some(CertificatePlan {
                        status_override: Some(Override::Fail),
                        ..certificate(true)
                    }),
                    ..Plan::default()
                },
            },
            Case {
                name: "certificate only, Status left out means ACTIVE",
                body: CERTIFICATE_ONLY,
                parameters: BTreeMap::new(),
                expected: Plan {
                    certificate: Some(certificate(true)),
                    ..Plan::default()
                },
            },
            Case {
                name: "upper snake case override keys, billing group, package versions ignored",
                body: ALIASES,
                parameters: BTreeMap::new(),
                expected: Plan {
                    thing: Some(ThingPlan {
                        billing_group: Some("billing".to_owned()),
                        attributes_override: Some(Override::Replace),
                        thing_type_override: Some(Override::DoNothing),
                        groups_override: Some(Override::Fail),
                        ..thing("fixed:name_1")
                    }),
                    certificate: Some(CertificatePlan {
                        status_override: Some(Override::DoNothing),
                        ..certificate(false)
                    }),
                    ..Plan::default()
                },
            },
            Case {
                name: "the request cannot set the pseudo parameter, extra parameters are ignored",
                body: PSEUDO_WITH_DEFAULT,
                parameters: params(&[
                    ("SerialNumber", "SN7"),
                    ("AWS::IoT::Certificate::Id", "someone-elses"),
                    ("Undeclared", "ignored"),
                ]),
                expected: Plan {
                    thing: Some(thing("SN7")),
                    certificate: Some(certificate(true)),
                    device_configuration: params(&[("Id", CERT)]),
                    ..Plan::default()
                },
            },
            Case {
                name: "empty Resources",
                body: r#"{ "Resources": {} }"#,
                parameters: params(&[("Anything", "x")]),
                expected: Plan::default(),
            },
        ]
    }

    #[test]
    fn evaluates_templates_into_plans() {
        for case in evaluation_cases() {
            let template = Template::parse(case.body)
                .unwrap_or_else(|e| panic!("{}: parse failed: {e}", case.name));
            let plan = template
                .evaluate(&case.parameters, CERT)
                .unwrap_or_else(|e| panic!("{}: evaluation failed: {e}", case.name));
            assert_eq!(plan, case.expected, "{}", case.name);
        }
    }

    #[test]
    fn a_parsed_template_evaluates_the_same_way_every_time() {
        let template = Template::parse(COMPOSED).unwrap();
        let first = template
            .evaluate(&params(&[("SerialNumber", "A")]), CERT)
            .unwrap();
        let other = template
            .evaluate(&params(&[("SerialNumber", "B")]), "other")
            .unwrap();
        let again = template
            .clone()
            .evaluate(&params(&[("SerialNumber", "A")]), CERT)
            .unwrap();
        assert_eq!(first, again);
        assert_eq!(other.thing.map(|t| t.name).as_deref(), Some("dev-B"));
        assert_eq!(
            other.certificate.map(|c| c.certificate_id).as_deref(),
            Some("other")
        );
    }

    #[test]
    fn parameter_names_leave_out_the_pseudo_parameter() {
        let cases: [(&str, &[&str]); 5] = [
            (COMPOSED, &["Region", "SerialNumber"]),
            (EMBEDDED_DEMO, &["SerialNumber"]),
            (
                GUIDE_STYLE,
                &["DeviceLocation", "SerialNumber", "ThingName"],
            ),
            (FIND_IN_MAP, &["MapName", "Region", "Tier"]),
            (CERTIFICATE_ONLY, &[]),
        ];
        for (body, expected) in cases {
            let template = Template::parse(body).unwrap();
            assert_eq!(template.parameter_names(), strings(expected));
        }
    }

    #[test]
    fn inline_policy_names_are_40_upper_hex_digits_of_the_document() {
        let name = inline_policy_name("{}");
        // SHA-256("{}") begins 44136fa355b3678a1146ad16f7e8649e94fb4fc2.
        assert_eq!(name, "44136FA355B3678A1146AD16F7E8649E94FB4FC2");
        assert_ne!(inline_policy_name("{ }"), name);
    }

    #[test]
    fn identical_policy_documents_get_the_same_name_whatever_their_key_order() {
        let body = |document: &str| {
            format!(
                r#"{{ "Resources": {{ "p": {{ "Type": "AWS::IoT::Policy", "Properties": {{ "PolicyDocument": {document} }} }} }} }}"#
            )
        };
        let a = Template::parse(&body(r#"{"Version": "2012-10-17", "Statement": []}"#))
            .unwrap()
            .evaluate(&BTreeMap::new(), CERT)
            .unwrap();
        let b = Template::parse(&body(r#"{"Statement": [], "Version": "2012-10-17"}"#))
            .unwrap()
            .evaluate(&BTreeMap::new(), CERT)
            .unwrap();
        assert_eq!(a.policies, b.policies);
        assert_eq!(
            a.policies,
            vec![inline(
                &inline_policy_name(r#"{"Statement":[],"Version":"2012-10-17"}"#),
                r#"{"Statement":[],"Version":"2012-10-17"}"#
            )]
        );
    }

    /// A template whose ThingName is `expression`, with a parameter and a map to refer to.
    fn with_thing_name(expression: &str) -> String {
        format!(
            r#"{{
              "Parameters": {{ "SerialNumber": {{ "Type": "String" }} }},
              "Mappings": {{ "M": {{ "a": {{ "b": "c" }} }} }},
              "Resources": {{ "thing": {{ "Type": "AWS::IoT::Thing", "Properties": {{ "ThingName": {expression} }} }} }}
            }}"#
        )
    }

    /// A template with one resource named `r` of the given JSON.
    fn with_resource(resource: &str) -> String {
        format!(
            r#"{{ "Parameters": {{ "P": {{ "Type": "String" }} }}, "Resources": {{ "r": {resource} }} }}"#
        )
    }

    /// A template with the given DeviceConfiguration section.
    fn with_configuration(configuration: &str) -> String {
        format!(
            r#"{{ "Parameters": {{ "P": {{ "Type": "String" }} }}, "Resources": {{}}, "DeviceConfiguration": {configuration} }}"#
        )
    }

    const NAME: &str = "Resources.thing.Properties.ThingName";

    fn refused_cases() -> Vec<(String, String, &'static str)> {
        let name = |suffix: &str| format!("{NAME}{suffix}");
        let thing = |expression: &str| with_thing_name(expression);
        let r = |suffix: &str| format!("Resources.r{suffix}");
        vec![
            // The body as a whole.
            ("{".into(), "templateBody".into(), "parse the template body as JSON"),
            ("[]".into(), "templateBody".into(), "must be a JSON object, found an array"),
            ("{}".into(), "Resources".into(), "missing required section"),
            (
                r#"{ "Resources": {}, "Conditions": {} }"#.into(),
                "Conditions".into(),
                "unsupported top-level section",
            ),
            (
                r#"{ "Resources": {}, "Outputs": {} }"#.into(),
                "Outputs".into(),
                "unsupported top-level section",
            ),
            (
                r#"{ "Resources": {}, "Metadata": {} }"#.into(),
                "Metadata".into(),
                "unsupported top-level section",
            ),
            (
                r#"{ "Resources": {}, "AWSTemplateFormatVersion": "2010-09-09" }"#.into(),
                "AWSTemplateFormatVersion".into(),
                "unsupported top-level section",
            ),
            (r#"{ "Resources": [] }"#.into(), "Resources".into(), "must be an object"),
            // Parameters.
            (
                r#"{ "Parameters": [], "Resources": {} }"#.into(),
                "Parameters".into(),
                "must be an object, found an array",
            ),
            (
                r#"{ "Parameters": { "N": { "Type": "Number" } }, "Resources": {} }"#.into(),
                "Parameters.N.Type".into(),
                "unsupported parameter type \"Number\"",
            ),
            (
                r#"{ "Parameters": { "L": { "Type": "CommaDelimitedList" } }, "Resources": {} }"#
                    .into(),
                "Parameters.L.Type".into(),
                "only \"String\" is supported",
            ),
            (
                r#"{ "Parameters": { "N": {} }, "Resources": {} }"#.into(),
                "Parameters.N".into(),
                "missing Type",
            ),
            (
                r#"{ "Parameters": { "N": "String" }, "Resources": {} }"#.into(),
                "Parameters.N".into(),
                "a parameter declaration must be an object",
            ),
            (
                r#"{ "Parameters": { "N": { "Type": "String", "Default": 3 } }, "Resources": {} }"#
                    .into(),
                "Parameters.N.Default".into(),
                "a parameter default must be a string, found a number",
            ),
            (
                r#"{ "Parameters": { "N": { "Type": "String", "AllowedValues": ["a"] } }, "Resources": {} }"#
                    .into(),
                "Parameters.N.AllowedValues".into(),
                "unsupported parameter attribute AllowedValues",
            ),
            // Mappings.
            (
                r#"{ "Mappings": { "M": { "a": { "b": { "Ref": "X" } } } }, "Resources": {} }"#
                    .into(),
                "Mappings.M.a.b".into(),
                "not allowed in Mappings",
            ),
            (
                r#"{ "Mappings": { "M": { "a": { "Fn::Join": ["", []] } } }, "Resources": {} }"#
                    .into(),
                "Mappings.M.a".into(),
                "not allowed in Mappings",
            ),
            (
                r#"{ "Mappings": { "M": { "Ref": "X" } }, "Resources": {} }"#.into(),
                "Mappings.M".into(),
                "not allowed in Mappings",
            ),
            (
                r#"{ "Mappings": { "M": { "a": { "b": 1 } } }, "Resources": {} }"#.into(),
                "Mappings.M.a.b".into(),
                "a mapping value must be a string, found a number",
            ),
            (
                r#"{ "Mappings": { "M": { "a": ["b"] } }, "Resources": {} }"#.into(),
                "Mappings.M.a".into(),
                "must be an object, found an array",
            ),
            (
                r#"{ "Mappings": { "M": "x" }, "Resources": {} }"#.into(),
                "Mappings.M".into(),
                "a mapping must be an object",
            ),
            // Unsupported functions, wherever they are.
            (thing(r#"{ "Fn::If": ["c", "a", "b"] }"#), NAME.into(), "unsupported function Fn::If"),
            (
                thing(r#"{ "Fn::GetAtt": ["thing", "Arn"] }"#),
                NAME.into(),
                "unsupported function Fn::GetAtt",
            ),
            (thing(r#"{ "Fn::Base64": "x" }"#), NAME.into(), "unsupported function Fn::Base64"),
            (thing(r#"{ "Condition": "IsProd" }"#), NAME.into(), "unsupported function Condition"),
            (
                thing(r#"{ "Fn::Join": ["", ["a", { "Fn::Equals": ["a", "b"] }]] }"#),
                name(".Fn::Join[1][1]"),
                "unsupported function Fn::Equals",
            ),
            (
                thing(r#"{ "Fn::Sub": ["${X}", { "X": { "Fn::ImportValue": "v" } }] }"#),
                name(".Fn::Sub[1].X"),
                "unsupported function Fn::ImportValue",
            ),
            (
                thing(r#"{ "Ref": "SerialNumber", "Fn::Join": ["", []] }"#),
                NAME.into(),
                "must have exactly one key, found Fn::Join, Ref",
            ),
            (
                thing(r#"{ "Name": "x" }"#),
                NAME.into(),
                "expected a string or an intrinsic function, found an object",
            ),
            (thing("42"), NAME.into(), "expected a string or an intrinsic function, found a number"),
            // Ref.
            (thing(r#"{ "Ref": "Missing" }"#), NAME.into(), "Ref to undeclared parameter Missing"),
            (
                thing(r#"{ "Ref": "AWS::IoT::Certificate::CommonName" }"#),
                NAME.into(),
                "Ref to undeclared parameter AWS::IoT::Certificate::CommonName",
            ),
            (thing(r#"{ "Ref": "thing" }"#), NAME.into(), "Ref to undeclared parameter thing"),
            (thing(r#"{ "Ref": ["SerialNumber"] }"#), NAME.into(), "Ref expects a parameter name"),
            // Fn::Join.
            (thing(r#"{ "Fn::Join": ["-"] }"#), name(".Fn::Join"), "Fn::Join expects 2 arguments"),
            (thing(r#"{ "Fn::Join": "-" }"#), name(".Fn::Join"), "Fn::Join expects an array"),
            (
                thing(r#"{ "Fn::Join": [{ "Ref": "SerialNumber" }, []] }"#),
                name(".Fn::Join[0]"),
                "the Fn::Join delimiter must be a literal string",
            ),
            (
                thing(r#"{ "Fn::Join": ["-", { "Ref": "SerialNumber" }] }"#),
                name(".Fn::Join[1]"),
                "expected a list, but Ref yields a string",
            ),
            (
                thing(r#"{ "Fn::Join": ["-", "a,b"] }"#),
                name(".Fn::Join[1]"),
                "expected a list or an intrinsic function yielding one, found a string",
            ),
            (
                thing(r#"{ "Fn::Join": ["-", [["nested"]]] }"#),
                name(".Fn::Join[1][0]"),
                "found an array",
            ),
            // Fn::Split and types.
            (
                thing(r#"{ "Fn::Split": [",", "a,b"] }"#),
                NAME.into(),
                "expected a string, but Fn::Split yields a list",
            ),
            (
                thing(r#"{ "Fn::Join": ["", [{ "Fn::Split": [",", "a"] }]] }"#),
                name(".Fn::Join[1][0]"),
                "expected a string, but Fn::Split yields a list",
            ),
            (
                thing(r#"{ "Fn::Join": ["", { "Fn::Split": ["", "a"] }] }"#),
                name(".Fn::Join[1].Fn::Split[0]"),
                "must not be empty",
            ),
            (
                thing(r#"{ "Fn::Join": ["", { "Fn::Split": [",", ["a"]] }] }"#),
                name(".Fn::Join[1].Fn::Split[1]"),
                "found an array",
            ),
            // Fn::Select.
            (
                thing(r#"{ "Fn::Select": [-1, ["a"]] }"#),
                name(".Fn::Select[0]"),
                "must be a non-negative integer, found -1",
            ),
            (
                thing(r#"{ "Fn::Select": [1.5, ["a"]] }"#),
                name(".Fn::Select[0]"),
                "must be a non-negative integer, found 1.5",
            ),
            (
                thing(r#"{ "Fn::Select": ["one", ["a"]] }"#),
                name(".Fn::Select[0]"),
                "must be a non-negative integer, found \"one\"",
            ),
            (
                thing(r#"{ "Fn::Select": [true, ["a"]] }"#),
                name(".Fn::Select[0]"),
                "must be a non-negative integer, found a boolean",
            ),
            (
                thing(r#"{ "Fn::Select": [0, "a"] }"#),
                name(".Fn::Select[1]"),
                "expected a list or an intrinsic function yielding one",
            ),
            (thing(r#"{ "Fn::Select": [0] }"#), name(".Fn::Select"), "Fn::Select expects 2 arguments"),
            // Fn::FindInMap.
            (
                thing(r#"{ "Fn::FindInMap": ["Nope", "a", "b"] }"#),
                name(".Fn::FindInMap[0]"),
                "Fn::FindInMap refers to unknown map Nope",
            ),
            (
                thing(r#"{ "Fn::FindInMap": ["M", "a"] }"#),
                name(".Fn::FindInMap"),
                "Fn::FindInMap expects 3 arguments",
            ),
            (
                thing(r#"{ "Fn::FindInMap": ["M", "a", "b", "default"] }"#),
                name(".Fn::FindInMap"),
                "Fn::FindInMap expects 3 arguments",
            ),
            (
                thing(r#"{ "Fn::FindInMap": ["M", { "Ref": "Nope" }, "b"] }"#),
                name(".Fn::FindInMap[1]"),
                "Ref to undeclared parameter Nope",
            ),
            // Fn::Sub.
            (
                thing(r#"{ "Fn::Sub": "dev-${Nope}" }"#),
                name(".Fn::Sub"),
                "Fn::Sub references undeclared name Nope",
            ),
            (
                thing(r#"{ "Fn::Sub": "dev-${thing.Arn}" }"#),
                name(".Fn::Sub"),
                "Fn::Sub references undeclared name thing.Arn",
            ),
            (
                thing(r#"{ "Fn::Sub": ["${Nope}", { "Other": "x" }] }"#),
                name(".Fn::Sub[0]"),
                "Fn::Sub references undeclared name Nope",
            ),
            (thing(r#"{ "Fn::Sub": "dev-${SerialNumber" }"#), name(".Fn::Sub"), "unterminated"),
            (thing(r#"{ "Fn::Sub": "dev-${}" }"#), name(".Fn::Sub"), "empty \"${}\""),
            (
                thing(r#"{ "Fn::Sub": ["a", "b"] }"#),
                name(".Fn::Sub[1]"),
                "the Fn::Sub variable map must be an object",
            ),
            (
                thing(r#"{ "Fn::Sub": ["a", { "Ref": "SerialNumber" }] }"#),
                name(".Fn::Sub[1]"),
                "found a function call",
            ),
            (
                thing(r#"{ "Fn::Sub": [{ "Ref": "SerialNumber" }, {}] }"#),
                name(".Fn::Sub[0]"),
                "the Fn::Sub template must be a literal string",
            ),
            (
                thing(r#"{ "Fn::Sub": ["a", {}, {}] }"#),
                name(".Fn::Sub"),
                "found 3 arguments",
            ),
            (thing(r#"{ "Fn::Sub": 1 }"#), name(".Fn::Sub"), "Fn::Sub expects a string or an array"),
            (
                thing(r#"{ "Fn::Sub": ["${V}", { "V": { "Fn::Split": [",", "a"] } }] }"#),
                name(".Fn::Sub[1].V"),
                "expected a string, but Fn::Split yields a list",
            ),
            // Resources.
            (
                r#"{ "Resources": { "r": "AWS::IoT::Thing" } }"#.into(),
                r(""),
                "a resource must be an object",
            ),
            (
                with_resource(r#"{ "Type": "AWS::IoT::ThingGroup", "Properties": {} }"#),
                r(".Type"),
                "unsupported resource type AWS::IoT::ThingGroup",
            ),
            (with_resource(r#"{ "Properties": {} }"#), r(""), "missing Type"),
            (
                with_resource(r#"{ "Type": ["AWS::IoT::Thing"], "Properties": {} }"#),
                r(".Type"),
                "must be a string",
            ),
            (with_resource(r#"{ "Type": "AWS::IoT::Policy" }"#), r(""), "missing Properties"),
            (
                with_resource(r#"{ "Type": "AWS::IoT::Policy", "Properties": [] }"#),
                r(".Properties"),
                "Properties must be an object",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "Fn::If": ["c", {}, {}] } }"#,
                ),
                r(".Properties"),
                "unsupported function Fn::If",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "p" }, "DependsOn": "x" }"#,
                ),
                r(".DependsOn"),
                "unsupported resource attribute DependsOn",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "p" }, "Condition": "IsProd" }"#,
                ),
                r(".Condition"),
                "unsupported resource attribute Condition",
            ),
            // Things.
            (
                with_resource(r#"{ "Type": "AWS::IoT::Thing", "Properties": {} }"#),
                r(".Properties"),
                "AWS::IoT::Thing needs ThingName",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "Tags": [] } }"#,
                ),
                r(".Properties.Tags"),
                "unsupported property Tags for AWS::IoT::Thing",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "ThingGroups": "g" } }"#,
                ),
                r(".Properties.ThingGroups"),
                "expected a list",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "ThingGroups": [1] } }"#,
                ),
                r(".Properties.ThingGroups[0]"),
                "found a number",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "AttributePayload": { "a": { "b": "c" } } } }"#,
                ),
                r(".Properties.AttributePayload.a"),
                "expected a string or an intrinsic function, found an object",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "AttributePayload": { "a": 1 } } }"#,
                ),
                r(".Properties.AttributePayload.a"),
                "found a number",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "AttributePayload": [] } }"#,
                ),
                r(".Properties.AttributePayload"),
                "AttributePayload must be an object",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "AttributePayload": { "Ref": "P" } } }"#,
                ),
                r(".Properties.AttributePayload"),
                "AttributePayload must be a map, not the result of Ref",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "ThingTypeName": { "Fn::GetAtt": ["x", "y"] } } }"#,
                ),
                r(".Properties.ThingTypeName"),
                "unsupported function Fn::GetAtt",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t", "BillingGroup": ["b"] } }"#,
                ),
                r(".Properties.BillingGroup"),
                "found an array",
            ),
            (
                r#"{ "Resources": {
                    "a": { "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "a" } },
                    "b": { "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "b" } } } }"#
                    .into(),
                "Resources.b".into(),
                "at most one AWS::IoT::Thing (already declared as a)",
            ),
            // Certificates.
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "CertificatePem": "-----BEGIN CERTIFICATE-----" } }"#,
                ),
                r(".Properties.CertificatePem"),
                "fleet provisioning templates may only use CertificateId",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "CertificateSigningRequest": { "Ref": "P" } } }"#,
                ),
                r(".Properties.CertificateSigningRequest"),
                "fleet provisioning templates may only use CertificateId",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "CACertificatePem": "x" } }"#,
                ),
                r(".Properties.CACertificatePem"),
                "fleet provisioning templates may only use CertificateId",
            ),
            (
                with_resource(r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "Status": "ACTIVE" } }"#),
                r(".Properties"),
                "AWS::IoT::Certificate needs CertificateId",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": "x", "Status": "REVOKED" } }"#,
                ),
                r(".Properties.Status"),
                "unsupported certificate Status \"REVOKED\"",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": "x", "Tags": [] } }"#,
                ),
                r(".Properties.Tags"),
                "unsupported property Tags for AWS::IoT::Certificate",
            ),
            (
                r#"{ "Resources": {
                    "c1": { "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": "a" } },
                    "c2": { "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": "b" } } } }"#
                    .into(),
                "Resources.c2".into(),
                "at most one AWS::IoT::Certificate (already declared as c1)",
            ),
            // Policies.
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "p", "PolicyDocument": {} } }"#,
                ),
                r(".Properties"),
                "exactly one of PolicyName or PolicyDocument, not both",
            ),
            (
                with_resource(r#"{ "Type": "AWS::IoT::Policy", "Properties": {} }"#),
                r(".Properties"),
                "needs exactly one of PolicyName or PolicyDocument",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyDocument": "{ not json" } }"#,
                ),
                r(".Properties.PolicyDocument"),
                "parse PolicyDocument as JSON",
            ),
            (
                with_resource(r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyDocument": "[]" } }"#),
                r(".Properties.PolicyDocument"),
                "PolicyDocument must hold a JSON object, found an array",
            ),
            (
                with_resource(r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyDocument": 7 } }"#),
                r(".Properties.PolicyDocument"),
                "PolicyDocument must be a JSON object or a string holding one, found a number",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyDocument": { "Statement": [{ "Resource": { "Fn::If": [] } }] } } }"#,
                ),
                r(".Properties.PolicyDocument.Statement[0].Resource"),
                "unsupported function Fn::If",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyDocument": { "Statement": [{ "Resource": { "Ref": "Nope" } }] } } }"#,
                ),
                r(".Properties.PolicyDocument.Statement[0].Resource"),
                "Ref to undeclared parameter Nope",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyDocument": { "Fn::Split": [",", "a"] } } }"#,
                ),
                r(".Properties.PolicyDocument"),
                "expected a string, but Fn::Split yields a list",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "p", "PolicyArn": "a" } }"#,
                ),
                r(".Properties.PolicyArn"),
                "unsupported property PolicyArn for AWS::IoT::Policy",
            ),
            // OverrideSettings.
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "p" }, "OverrideSettings": {} }"#,
                ),
                r(".OverrideSettings"),
                "OverrideSettings are not available for AWS::IoT::Policy",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t" }, "OverrideSettings": { "ThingName": "REPLACE" } }"#,
                ),
                r(".OverrideSettings.ThingName"),
                "unsupported override key ThingName for AWS::IoT::Thing",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t" }, "OverrideSettings": { "ThingTypeName": "MERGE" } }"#,
                ),
                r(".OverrideSettings.ThingTypeName"),
                "MERGE is only allowed for the thing's AttributePayload and ThingGroups",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t" }, "OverrideSettings": { "ThingGroups": "KEEP" } }"#,
                ),
                r(".OverrideSettings.ThingGroups"),
                "unsupported override setting \"KEEP\"",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t" }, "OverrideSettings": { "ThingGroups": "merge" } }"#,
                ),
                r(".OverrideSettings.ThingGroups"),
                "unsupported override setting \"merge\"",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t" }, "OverrideSettings": { "ThingGroups": { "Ref": "P" } } }"#,
                ),
                r(".OverrideSettings.ThingGroups"),
                "an override setting must be one of DO_NOTHING, REPLACE, FAIL, MERGE, found an object",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t" }, "OverrideSettings": { "AttributePayload": "MERGE", "ATTRIBUTE_PAYLOAD": "REPLACE" } }"#,
                ),
                r(".OverrideSettings.AttributePayload"),
                "given twice",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Thing", "Properties": { "ThingName": "t" }, "OverrideSettings": "REPLACE" }"#,
                ),
                r(".OverrideSettings"),
                "OverrideSettings must be an object",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": "c" }, "OverrideSettings": { "Status": "MERGE" } }"#,
                ),
                r(".OverrideSettings.Status"),
                "MERGE is only allowed",
            ),
            (
                with_resource(
                    r#"{ "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": "c" }, "OverrideSettings": { "CertificateId": "REPLACE" } }"#,
                ),
                r(".OverrideSettings.CertificateId"),
                "unsupported override key CertificateId for AWS::IoT::Certificate",
            ),
            // DeviceConfiguration.
            (
                with_configuration(r#"{ "Nested": { "a": "b" } }"#),
                "DeviceConfiguration.Nested".into(),
                "nested objects are not supported in DeviceConfiguration",
            ),
            (
                with_configuration(r#"{ "List": ["a"] }"#),
                "DeviceConfiguration.List".into(),
                "found an array",
            ),
            (
                with_configuration(r#"{ "Number": 3 }"#),
                "DeviceConfiguration.Number".into(),
                "found a number",
            ),
            (
                with_configuration(r#"{ "Split": { "Fn::Split": [",", "a,b"] } }"#),
                "DeviceConfiguration.Split".into(),
                "expected a string, but Fn::Split yields a list",
            ),
            (
                with_configuration(r#"{ "If": { "Fn::If": ["c", "a", "b"] } }"#),
                "DeviceConfiguration.If".into(),
                "unsupported function Fn::If",
            ),
            (
                with_configuration(r#"{ "Ref": "P" }"#),
                "DeviceConfiguration".into(),
                "must be a map, not the result of Ref",
            ),
            (
                with_configuration(r#"["a"]"#),
                "DeviceConfiguration".into(),
                "the DeviceConfiguration section must be an object",
            ),
        ]
    }

    #[test]
    fn refuses_invalid_templates_with_the_path() {
        for (body, path, message) in refused_cases() {
            let error = Template::parse(&body)
                .map(|_| ())
                .expect_err(&format!("expected {path}: {message} for {body}"));
            assert_eq!(error.path, path, "path for {message:?}: {error}");
            assert!(
                error.message.contains(message),
                "message for {path}: expected {message:?} in {:?}",
                error.message
            );
        }
    }

    #[test]
    fn refusal_names_the_path_and_the_function() {
        let body = with_thing_name(r#"{ "Fn::If": ["IsProd", "a", "b"] }"#);
        let error = Template::parse(&body).map(|_| ()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "Resources.thing.Properties.ThingName: unsupported function Fn::If"
        );
    }

    #[test]
    fn the_refusal_table_bodies_are_otherwise_valid() {
        // Guards the refusal table: with a valid ThingName the same scaffolding parses, so each
        // refusal above is caused by the construct under test.
        Template::parse(&with_thing_name(r#"{ "Ref": "SerialNumber" }"#)).unwrap();
        Template::parse(&with_resource(
            r#"{ "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "p" } }"#,
        ))
        .unwrap();
        Template::parse(&with_configuration(r#"{ "a": { "Ref": "P" } }"#)).unwrap();
    }

    fn eval_error_cases() -> Vec<(String, BTreeMap<String, String>, &'static str, &'static str)> {
        let thing = |expression: &str| with_thing_name(expression);
        vec![
            (
                COMPOSED.into(),
                BTreeMap::new(),
                "Resources.thing.Properties.ThingName.Fn::Join[1][1]",
                "parameter SerialNumber has no value in the request and no default",
            ),
            (
                COMPOSED.into(),
                params(&[("SerialNumber", "1"), ("Region", "us")]),
                "DeviceConfiguration.OtaUrl",
                "map Endpoints has no top-level key \"us\"",
            ),
            (
                FIND_IN_MAP.into(),
                params(&[("Region", "us"), ("Tier", "pro")]),
                "DeviceConfiguration.Url",
                "map Endpoints has no second-level key \"pro\" under \"us\"",
            ),
            (
                FIND_IN_MAP.into(),
                params(&[("MapName", "Nope")]),
                "DeviceConfiguration.Computed",
                "there is no map \"Nope\"",
            ),
            (
                SELECT_SPLIT.into(),
                params(&[("Csv", "a,b")]),
                "Resources.thing.Properties.BillingGroup",
                "Fn::Select index 2 is out of range for a list of 2 item(s)",
            ),
            (
                SELECT_SPLIT.into(),
                params(&[("Csv", "a,b,c"), ("Idx", "2")]),
                "DeviceConfiguration.Computed",
                "Fn::Select index 2 is out of range for a list of 2 item(s)",
            ),
            (
                SELECT_SPLIT.into(),
                params(&[("Csv", "a,b,c"), ("Idx", "first")]),
                "DeviceConfiguration.Computed",
                "the Fn::Select index must be a non-negative integer, got \"first\"",
            ),
            (
                SELECT_SPLIT.into(),
                params(&[("Csv", "a,b,c"), ("Idx", "-1")]),
                "DeviceConfiguration.Computed",
                "must be a non-negative integer",
            ),
            (
                SUB_STRING.into(),
                BTreeMap::new(),
                "Resources.thing.Properties.ThingName.Fn::Sub",
                "parameter SerialNumber has no value",
            ),
            (
                SUB_VARIABLES.into(),
                params(&[("SerialNumber", "1"), ("Product", "lamp")]),
                "DeviceConfiguration.Shadowed.Fn::Sub[1].Version",
                "Fn::Select index 1 is out of range for a list of 1 item(s)",
            ),
            (
                STATUS_REF.into(),
                params(&[("Status", "PENDING_ACTIVATION")]),
                "Resources.certificate.Properties.Status",
                "unsupported certificate Status \"PENDING_ACTIVATION\"",
            ),
            (
                POLICIES.into(),
                BTreeMap::new(),
                "Resources.a_computed.Properties.PolicyDocument.Fn::Sub",
                "parameter ThingName has no value",
            ),
            (
                POLICIES.into(),
                params(&[("ThingName", "a\"b")]),
                "Resources.a_computed.Properties.PolicyDocument",
                "parse PolicyDocument as JSON",
            ),
            (
                POLICY_OBJECT.into(),
                params(&[("ThingName", "dev1")]),
                "Resources.policy.Properties.PolicyDocument.Statement[1].Resource.Fn::Split[1]",
                "parameter Topics has no value",
            ),
            (
                thing(r#"{ "Ref": "SerialNumber" }"#),
                params(&[("SerialNumber", "has space")]),
                NAME,
                "ThingName evaluates to \"has space\", which is not a valid thing name",
            ),
            (
                thing(r#"{ "Ref": "SerialNumber" }"#),
                params(&[("SerialNumber", "")]),
                NAME,
                "ThingName evaluates to \"\"",
            ),
            (
                thing(r#"{ "Ref": "SerialNumber" }"#),
                params(&[("SerialNumber", &"x".repeat(129))]),
                NAME,
                "not a valid thing name",
            ),
            (
                thing(r#"{ "Fn::FindInMap": ["M", { "Ref": "SerialNumber" }, "b"] }"#),
                params(&[("SerialNumber", "z")]),
                NAME,
                "map M has no top-level key \"z\"",
            ),
            (
                thing(r#"{ "Fn::FindInMap": ["M", "a", "z"] }"#),
                BTreeMap::new(),
                NAME,
                "map M has no second-level key \"z\" under \"a\"",
            ),
            (
                thing(r#"{ "Fn::Select": [3, ["a"]] }"#),
                BTreeMap::new(),
                NAME,
                "Fn::Select index 3 is out of range for a list of 1 item(s)",
            ),
        ]
    }

    #[test]
    fn evaluation_errors_name_the_path() {
        for (body, parameters, path, message) in eval_error_cases() {
            let template = Template::parse(&body)
                .unwrap_or_else(|e| panic!("{path}: the template should parse: {e}"));
            let error = template
                .evaluate(&parameters, CERT)
                .expect_err(&format!("expected {path}: {message}"));
            assert_eq!(error.path, path, "path for {message:?}: {error}");
            assert!(
                error.message.contains(message),
                "message for {path}: expected {message:?} in {:?}",
                error.message
            );
        }
    }

    #[test]
    fn thing_names_at_the_length_limit_are_accepted() {
        let template = Template::parse(&with_thing_name(r#"{ "Ref": "SerialNumber" }"#)).unwrap();
        let name = "a:_-Z9".repeat(21) + "ab";
        assert_eq!(name.len(), 128);
        let plan = template
            .evaluate(&params(&[("SerialNumber", &name)]), CERT)
            .unwrap();
        assert_eq!(plan.thing.map(|t| t.name), Some(name));
    }

    #[test]
    fn errors_display_as_path_and_message() {
        let error = EvalError {
            path: "DeviceConfiguration.Url".into(),
            message: "boom".into(),
        };
        assert_eq!(error.to_string(), "DeviceConfiguration.Url: boom");
    }
}
