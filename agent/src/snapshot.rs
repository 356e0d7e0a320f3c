//! What readers (systemd STATUS=, D-Bus properties, iotctl) see of the agent: a `Snapshot`
//! made from the state machine by a pure function, published through a `watch` channel by the
//! core. Readers never lock anything and never wait for the core.

use std::path::PathBuf;

use crate::cloud::rfc3339;
use crate::fsm::{Machine, Work};
use crate::store::{LastError, Operation};

/// The agent as readers see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// One of `iotd_api::state::*`.
    pub state: &'static str,
    /// The step of the operation in progress, "provisioned", or "waiting-for-claim".
    pub step: &'static str,
    /// What the agent waits for, in words ("a claim: …"); `None` when it is not waiting.
    pub waiting_for: Option<String>,
    /// A scheduled rotation is due and waits for the system clock to be synchronised (the D-Bus
    /// side then asks systemd-timedated).
    pub waiting_for_clock: bool,
    pub thing_name: Option<String>,
    pub certificate_id: Option<String>,
    pub certificate_not_after: Option<i64>,
    pub certificate_not_before: Option<i64>,
    pub certificate_path: Option<PathBuf>,
    /// The certificate a rotation replaced, kept until `previous_delete_after` as a fallback.
    pub previous_certificate_id: Option<String>,
    pub previous_delete_after: Option<i64>,
    /// When the next scheduled rotation starts (Unix seconds); `None` without an identity or
    /// while an operation runs.
    pub next_rotation: Option<i64>,
    /// "file" or "tpm".
    pub key_backend: &'static str,
    /// Where the key is (`DeviceKey::location`), once there is one.
    pub key_reference: Option<String>,
    pub connected: bool,
    /// "host:port": where the identity belongs (or, before there is one, where the claim at
    /// hand is for), which an installer's claim can have made another allowed endpoint than
    /// `cloud.endpoint`.
    pub endpoint: String,
    pub last_error: Option<LastError>,
    pub onboarding_open: bool,
    pub onboarding_closes_at: Option<i64>,
    /// Counted pairing attempts left in the window (0 when closed or not served).
    pub onboarding_attempts_left: u32,
    /// Whether the gateway is announced for discovery (DNS-SD), in words; "" when onboarding
    /// is not served.
    pub onboarding_discovery: String,
    /// The one-line summary also sent as systemd STATUS=.
    pub status_line: String,
}

/// What the snapshot needs beyond the state machine.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub key_backend: &'static str,
    /// Where the current key is, when the core knows it.
    pub key_reference: Option<String>,
    pub endpoint: String,
    /// The state directory, for certificate paths.
    pub state_dir: PathBuf,
    /// What the agent waits for, when it waits for a claim.
    pub waiting_for_claim: Option<String>,
}

/// " in 3 s" for a transient error with a scheduled retry.
fn retry_in(e: &LastError) -> String {
    match e.retry_at {
        Some(t) if !e.permanent => format!(" in {} s", (t - e.at).max(0)),
        _ => String::new(),
    }
}

/// The snapshot of `machine`.
pub fn snapshot(machine: &Machine, cx: &Context) -> Snapshot {
    let state = &machine.state;
    let waiting = machine.work() == Work::WaitForClaim;
    let waiting_for = waiting.then(|| {
        cx.waiting_for_claim
            .clone()
            .unwrap_or_else(|| "a claim".to_owned())
    });
    let op_step = state.operation.as_ref().and_then(Operation::step);
    let step = match (&state.identity, &state.operation) {
        (_, Some(_)) => match op_step {
            Some(s) => s.name(),
            None if waiting => "waiting-for-claim",
            None => "starting",
        },
        (Some(_), None) => "provisioned",
        (None, None) => "waiting-for-claim",
    };
    let api_state = match (&state.identity, &state.operation) {
        _ if machine.parked || machine.halted => iotd_api::state::FAILED,
        (Some(_), _) => iotd_api::state::PROVISIONED,
        (None, Some(_)) => iotd_api::state::PROVISIONING,
        (None, None) => iotd_api::state::UNPROVISIONED,
    };
    let cert_path = |g: u32| {
        cx.state_dir
            .join("gen")
            .join(g.to_string())
            .join("cert.pem")
    };
    let (thing_name, certificate_id, not_after, certificate_path) = match (&state.identity, op_step)
    {
        (Some(i), _) => (
            Some(i.thing_name.clone()),
            Some(i.certificate_id.clone()),
            Some(i.not_after),
            Some(cert_path(i.generation)),
        ),
        (None, Some(step)) => (
            match step {
                crate::store::Step::ThingRegistered { thing_name, .. } => Some(thing_name.clone()),
                _ => None,
            },
            step.certificate_id().map(str::to_owned),
            None,
            step.certificate_id().map(|_| cert_path(step.generation())),
        ),
        (None, None) => (None, None, None, None),
    };
    let mut snap = Snapshot {
        state: api_state,
        step,
        waiting_for,
        waiting_for_clock: false,
        thing_name,
        certificate_id,
        certificate_not_after: not_after,
        certificate_not_before: state.identity.as_ref().map(|i| i.not_before),
        certificate_path,
        previous_certificate_id: state
            .previous
            .as_ref()
            .map(|p| p.identity.certificate_id.clone()),
        previous_delete_after: state.previous.as_ref().map(|p| p.delete_after),
        next_rotation: None,
        key_backend: cx.key_backend,
        key_reference: cx.key_reference.clone(),
        connected: machine.connected,
        endpoint: cx.endpoint.clone(),
        last_error: state.last_error.clone(),
        onboarding_open: false,
        onboarding_closes_at: None,
        onboarding_attempts_left: 0,
        onboarding_discovery: String::new(),
        status_line: String::new(),
    };
    snap.status_line = status_line(machine, &snap);
    snap
}

/// A one-line summary for STATUS= and logs.
fn status_line(machine: &Machine, snap: &Snapshot) -> String {
    let state = &machine.state;
    let error = state.last_error.as_ref();
    if machine.parked || machine.halted {
        let message = error.map_or("stopped", |e| e.message.as_str());
        return format!("Failed at {}: {message}", snap.step);
    }
    if let Some(identity) = &state.identity {
        let thing = &identity.thing_name;
        return match (machine.connected, error) {
            (true, _) => format!(
                "Provisioned as {thing}; certificate valid until {}",
                rfc3339(identity.not_after)
            ),
            (false, Some(e)) => format!(
                "Provisioned as {thing}; disconnected, retrying{}: {}",
                retry_in(e),
                e.message
            ),
            (false, None) => format!("Provisioned as {thing}; connecting"),
        };
    }
    if let Some(waiting) = &snap.waiting_for {
        // What it waits for says why (the last error stays in LastError).
        return format!("Waiting for {waiting}");
    }
    match error {
        Some(e) => format!(
            "Provisioning ({}); retrying{}: {}",
            snap.step,
            retry_in(e),
            e.message
        ),
        None => format!("Provisioning ({})", snap.step),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fsm::Policy;
    use crate::store::{ClaimOrigin, Identity, State, Step};

    fn machine(state: State) -> Machine {
        Machine::resume(state, Policy::default()).0
    }

    fn identity() -> Identity {
        Identity {
            endpoint: None,
            generation: 2,
            certificate_id: "c2".into(),
            certificate_pem: "PEM".into(),
            thing_name: "gw-1".into(),
            key: None,
            not_before: 0,
            not_after: 2_524_607_999,
            device_configuration: Default::default(),
            committed_at: 0,
            installer_parameters: Default::default(),
        }
    }

    #[test]
    fn waiting_for_a_claim_says_what_for() {
        let m = machine(State::default());
        let cx = Context {
            waiting_for_claim: Some("a claim: /etc/iotd/claim.pem does not exist".into()),
            ..Context::default()
        };
        let s = snapshot(&m, &cx);
        assert_eq!((s.state, s.step), ("unprovisioned", "waiting-for-claim"));
        assert_eq!(
            s.status_line,
            "Waiting for a claim: /etc/iotd/claim.pem does not exist"
        );
        assert_eq!(s.waiting_for, cx.waiting_for_claim);
    }

    #[test]
    fn provisioning_shows_its_step_and_its_certificate() {
        let mut m = machine(State {
            operation: Some(Operation::Provisioning {
                claim: ClaimOrigin::File,
                step: Some(Step::CertificateIssued {
                    endpoint: None,
                    generation: 1,
                    certificate_id: "c1".into(),
                    certificate_pem: "PEM".into(),
                    ownership_token: "t".into(),
                    issued_at: 0,
                }),
            }),
            ..State::default()
        });
        m.claim = Some(ClaimOrigin::File);
        let s = snapshot(
            &m,
            &Context {
                state_dir: "/s".into(),
                ..Context::default()
            },
        );
        assert_eq!((s.state, s.step), ("provisioning", "certificate-issued"));
        assert_eq!(s.certificate_id.as_deref(), Some("c1"));
        assert_eq!(s.certificate_path, Some(PathBuf::from("/s/gen/1/cert.pem")));
        assert_eq!(s.status_line, "Provisioning (certificate-issued)");
        assert_eq!(s.waiting_for, None);
    }

    #[test]
    fn a_live_identity_is_provisioned_whatever_the_operation_did() {
        let mut m = machine(State {
            identity: Some(identity()),
            last_error: Some(LastError {
                sticky: false,
                code: "network".into(),
                message: "no route".into(),
                at: 10,
                permanent: false,
                retry_at: Some(13),
            }),
            ..State::default()
        });
        let s = snapshot(&m, &Context::default());
        assert_eq!((s.state, s.step), ("provisioned", "provisioned"));
        assert_eq!(
            s.status_line,
            "Provisioned as gw-1; disconnected, retrying in 3 s: no route"
        );
        m.connected = true;
        let s = snapshot(&m, &Context::default());
        assert_eq!(
            s.status_line,
            "Provisioned as gw-1; certificate valid until 2049-12-31T23:59:59Z"
        );
        assert_eq!(s.certificate_not_after, Some(2_524_607_999));
    }

    #[test]
    fn parked_is_failed_with_the_cause() {
        let mut m = machine(State {
            operation: Some(Operation::Provisioning {
                claim: ClaimOrigin::File,
                step: Some(Step::KeyReady { generation: 1 }),
            }),
            last_error: Some(LastError {
                sticky: false,
                code: "claim-rejected".into(),
                message: "the claim was refused".into(),
                at: 1,
                permanent: true,
                retry_at: None,
            }),
            ..State::default()
        });
        m.parked = true;
        let s = snapshot(&m, &Context::default());
        assert_eq!((s.state, s.step), ("failed", "key-ready"));
        assert_eq!(s.status_line, "Failed at key-ready: the claim was refused");
    }
}
