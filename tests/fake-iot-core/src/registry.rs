//! The registry: certificates, things, policies, templates, ownership tokens and jobs, persisted
//! as one JSON document in the state directory. It is plain data; the server holds it behind a
//! mutex that is never held across I/O (writes to disk happen from a snapshot, outside the lock).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::policy::PolicyDocument;
use crate::template::Template;

/// Certificate statuses of the AWS IoT control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertStatus {
    Active,
    Inactive,
    Revoked,
    PendingActivation,
    PendingTransfer,
    RegisterInactive,
}

impl CertStatus {
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Inactive => "INACTIVE",
            Self::Revoked => "REVOKED",
            Self::PendingActivation => "PENDING_ACTIVATION",
            Self::PendingTransfer => "PENDING_TRANSFER",
            Self::RegisterInactive => "REGISTER_INACTIVE",
        }
    }
}

/// A certificate known to the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Certificate {
    pub id: String,
    pub pem: String,
    pub status: CertStatus,
    pub created_at: i64,
    pub last_modified_at: i64,
    pub not_before: i64,
    pub not_after: i64,
    #[serde(default)]
    pub policies: BTreeSet<String>,
    #[serde(default)]
    pub things: BTreeSet<String>,
    /// Set for trusted-user claims from CreateProvisioningClaim: implicit permissions for
    /// this template's provisioning topics only, and no listing in the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temporary_claim_for: Option<String>,
    #[serde(default)]
    pub customer_version: u32,
    /// The provisioning template this certificate belongs to: the template of a `--claim`, or
    /// the one whose RegisterThing activated it. Not an AWS field: it picks a template's
    /// certificate validity (`/_fake/certificate-validity`) for what this certificate's
    /// connections have issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// An ownership token returned by a create call, good for one RegisterThing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnershipToken {
    pub certificate_id: String,
    pub issued_at: i64,
    pub expires_at: i64,
    pub used: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Thing {
    pub name: String,
    pub id: String,
    #[serde(default)]
    pub thing_type: Option<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub groups: BTreeSet<String>,
    #[serde(default)]
    pub billing_group: Option<String>,
    pub version: u64,
    #[serde(default)]
    pub principals: BTreeSet<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub name: String,
    pub document: String,
    pub version_id: u32,
    pub created_at: i64,
    #[serde(skip)]
    pub parsed: Option<PolicyDocument>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    pub target_arn: String,
    #[serde(default)]
    pub payload_version: Option<String>,
}

/// One version of a template's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateVersion {
    pub body: String,
    pub created_at: i64,
}

/// A provisioning template. `body`/`parsed` are the default version's, which RegisterThing
/// evaluates; `versions` holds every version, the default included.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningTemplate {
    pub name: String,
    pub body: String,
    pub enabled: bool,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub role_arn: Option<String>,
    #[serde(default)]
    pub hook: Option<Hook>,
    pub created_at: i64,
    pub last_modified_at: i64,
    pub default_version_id: u32,
    #[serde(default = "fleet_provisioning")]
    pub template_type: String,
    #[serde(default)]
    pub versions: BTreeMap<u32, TemplateVersion>,
    #[serde(skip)]
    pub parsed: Option<Template>,
}

fn fleet_provisioning() -> String {
    "FLEET_PROVISIONING".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamedResource {
    pub name: String,
    pub id: String,
    #[serde(default)]
    pub properties: serde_json::Value,
    pub created_at: i64,
}

/// A job (Jobs API subset).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub document: serde_json::Value,
    #[serde(default)]
    pub description: Option<String>,
    pub targets: Vec<String>,
    pub created_at: i64,
    pub status: String,
    #[serde(default)]
    pub step_timeout_minutes: Option<i64>,
    /// `SNAPSHOT` (the default) or `CONTINUOUS`: a continuous job also runs on things that
    /// become targets later (added to a target group, or AssociateTargetsWithJob).
    #[serde(default = "snapshot")]
    pub target_selection: String,
}

fn snapshot() -> String {
    "SNAPSHOT".to_owned()
}

impl Job {
    pub fn is_continuous(&self) -> bool {
        self.target_selection == "CONTINUOUS"
    }
}

/// One thing's execution of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobExecution {
    pub job_id: String,
    pub thing_name: String,
    pub status: String,
    #[serde(default)]
    pub status_details: BTreeMap<String, String>,
    pub queued_at: i64,
    #[serde(default)]
    pub started_at: Option<i64>,
    pub last_updated_at: i64,
    pub version_number: i64,
    pub execution_number: i64,
    #[serde(default)]
    pub step_timeout_at: Option<i64>,
}

impl JobExecution {
    /// A new execution, QUEUED.
    pub fn queued(job_id: &str, thing: &str, now: i64) -> Self {
        Self {
            job_id: job_id.to_owned(),
            thing_name: thing.to_owned(),
            status: "QUEUED".to_owned(),
            status_details: BTreeMap::new(),
            queued_at: now,
            started_at: None,
            last_updated_at: now,
            version_number: 1,
            execution_number: 1,
            step_timeout_at: None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "SUCCEEDED" | "FAILED" | "TIMED_OUT" | "REJECTED" | "REMOVED" | "CANCELED"
        )
    }
}

/// Everything the fake knows, as persisted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    #[serde(default)]
    pub clock_offset: i64,
    #[serde(default)]
    pub certificates: BTreeMap<String, Certificate>,
    #[serde(default)]
    pub tokens: BTreeMap<String, OwnershipToken>,
    #[serde(default)]
    pub things: BTreeMap<String, Thing>,
    #[serde(default)]
    pub policies: BTreeMap<String, Policy>,
    #[serde(default)]
    pub templates: BTreeMap<String, ProvisioningTemplate>,
    #[serde(default)]
    pub thing_types: BTreeMap<String, NamedResource>,
    #[serde(default)]
    pub thing_groups: BTreeMap<String, NamedResource>,
    #[serde(default)]
    pub jobs: BTreeMap<String, Job>,
    /// Keyed by "thingName/jobId".
    #[serde(default)]
    pub executions: BTreeMap<String, JobExecution>,
}

/// A random id in the shape of an AWS UUID.
pub fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Registry {
    /// Parses the persisted document and re-parses templates and policies.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let mut reg: Registry = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for t in reg.templates.values_mut() {
            t.parsed =
                Some(Template::parse(&t.body).map_err(|e| format!("template {}: {e}", t.name))?);
        }
        for p in reg.policies.values_mut() {
            p.parsed = Some(
                PolicyDocument::parse(&p.document)
                    .map_err(|e| format!("policy {}: {e}", p.name))?,
            );
        }
        Ok(reg)
    }

    /// Deletes what AWS deletes on its own: certificates whose ownership token expired before
    /// they were registered, and expired tokens; and times out job steps. Returns the things
    /// whose job executions timed out, for their notifications.
    pub fn sweep(&mut self, now: i64) -> Vec<String> {
        let expired: Vec<String> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(token) = self.tokens.remove(&key) {
                let orphan = self
                    .certificates
                    .get(&token.certificate_id)
                    .is_some_and(|c| {
                        c.status == CertStatus::PendingActivation
                            && c.things.is_empty()
                            && c.policies.is_empty()
                    });
                if orphan {
                    self.certificates.remove(&token.certificate_id);
                }
            }
        }
        // Trusted-user claims vanish once expired.
        self.certificates
            .retain(|_, c| c.temporary_claim_for.is_none() || c.not_after > now);
        let mut timed_out = Vec::new();
        for exec in self.executions.values_mut() {
            if exec.status == "IN_PROGRESS" && exec.step_timeout_at.is_some_and(|t| t <= now) {
                exec.status = "TIMED_OUT".to_owned();
                exec.last_updated_at = now;
                exec.version_number += 1;
                exec.step_timeout_at = None;
                timed_out.push(exec.thing_name.clone());
            }
        }
        timed_out
    }

    /// Attaches a certificate to a thing (both sides of the relation).
    pub fn attach_principal(&mut self, thing: &str, cert_id: &str) {
        if let Some(t) = self.things.get_mut(thing) {
            t.principals.insert(cert_id.to_owned());
        }
        if let Some(c) = self.certificates.get_mut(cert_id) {
            c.things.insert(thing.to_owned());
        }
    }

    /// Detaches a certificate from a thing.
    pub fn detach_principal(&mut self, thing: &str, cert_id: &str) {
        if let Some(t) = self.things.get_mut(thing) {
            t.principals.remove(cert_id);
        }
        if let Some(c) = self.certificates.get_mut(cert_id) {
            c.things.remove(thing);
        }
    }

    /// The group and its ancestors.
    pub fn group_and_ancestors(&self, group: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut current = Some(group.to_owned());
        while let Some(name) = current {
            // A cycle cannot be made through the API; stop rather than loop if one appears.
            if !out.insert(name.clone()) {
                break;
            }
            current = self
                .thing_groups
                .get(&name)
                .and_then(|g| g.properties["parentGroupName"].as_str())
                .map(str::to_owned);
        }
        out
    }

    /// Whether a job target ARN (`thing/…` or `thinggroup/…` after `arn_prefix`, which ends in
    /// `:`) covers `thing`: the thing itself, or a group it is in directly or through a
    /// descendant group.
    pub fn target_covers(&self, arn_prefix: &str, target: &str, thing: &str) -> bool {
        let Some(rest) = target.strip_prefix(arn_prefix) else {
            return false;
        };
        if let Some(name) = rest.strip_prefix("thing/") {
            return name == thing;
        }
        let Some(group) = rest.strip_prefix("thinggroup/") else {
            return false;
        };
        self.things.get(thing).is_some_and(|t| {
            t.groups
                .iter()
                .any(|g| self.group_and_ancestors(g).contains(group))
        })
    }

    /// Queues an execution of every IN_PROGRESS continuous job that now covers `thing` and has
    /// none for it yet (a thing that joined a target group). Returns whether any was queued.
    pub fn apply_continuous_jobs(&mut self, arn_prefix: &str, thing: &str, now: i64) -> bool {
        let due: Vec<String> = self
            .jobs
            .values()
            .filter(|j| j.is_continuous() && j.status == "IN_PROGRESS")
            .filter(|j| !self.executions.contains_key(&format!("{thing}/{}", j.id)))
            .filter(|j| {
                j.targets
                    .iter()
                    .any(|t| self.target_covers(arn_prefix, t, thing))
            })
            .map(|j| j.id.clone())
            .collect();
        for job_id in &due {
            self.executions.insert(
                format!("{thing}/{job_id}"),
                JobExecution::queued(job_id, thing, now),
            );
        }
        !due.is_empty()
    }

    /// Pending job executions of a thing, IN_PROGRESS first then by queue time (Jobs API order).
    pub fn pending_executions(&self, thing: &str) -> Vec<&JobExecution> {
        let mut list: Vec<&JobExecution> = self
            .executions
            .values()
            .filter(|e| {
                e.thing_name == thing && matches!(e.status.as_str(), "QUEUED" | "IN_PROGRESS")
            })
            .collect();
        list.sort_by_key(|e| (e.status != "IN_PROGRESS", e.queued_at, e.job_id.clone()));
        list
    }
}
