//! Start-up: state directory, CA, registry, templates and claims from the command line,
//! listeners, the ready line, and shutdown on SIGTERM/SIGINT.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ca::Authority;
use crate::clock::Clock;
use crate::registry::{
    CertStatus, Certificate, Policy, ProvisioningTemplate, Registry, TemplateVersion,
};
use crate::server::{Settings, Shared};
use crate::template::Template;

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct Options {
    pub settings: Settings,
    pub mqtt: SocketAddr,
    pub mqtt_alpn: SocketAddr,
    pub http: SocketAddr,
    pub templates: Vec<(String, String)>,
    pub claims: Vec<(String, String)>,
}

/// A start-up failure, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("creating state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading registry {path}: {message}")]
    Registry { path: PathBuf, message: String },
    #[error("{0}")]
    Ca(#[from] crate::ca::CaError),
    #[error("reading template {name} from {path}: {message}")]
    Template {
        name: String,
        path: String,
        message: String,
    },
    #[error("--claim {name}={template}: no template {template} (give it with --template)")]
    ClaimTemplate { name: String, template: String },
    #[error("writing claim {path}: {source}")]
    Claim {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("building the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("waiting for signals: {0}")]
    Signal(std::io::Error),
}

fn load_registry(dir: &Path) -> Result<Registry, StartError> {
    let path = dir.join("registry.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Registry::from_json(&text).map_err(|message| StartError::Registry { path, message })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
        Err(e) => Err(StartError::Registry {
            path,
            message: e.to_string(),
        }),
    }
}

/// The claim policy AWS's docs recommend, covering both create APIs and one template.
pub fn claim_policy_document(settings: &Settings, template: &str) -> String {
    let arn = |r: &str| settings.arn(r);
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": [
                arn("topic/$aws/certificates/create/*"),
                arn("topic/$aws/certificates/create-from-csr/*"),
                arn(&format!("topic/$aws/provisioning-templates/{template}/provision/*")),
            ]},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
                arn("topicfilter/$aws/certificates/create/*"),
                arn("topicfilter/$aws/certificates/create-from-csr/*"),
                arn(&format!("topicfilter/$aws/provisioning-templates/{template}/provision/*")),
            ]}
        ]
    })
    .to_string()
}

fn apply_templates(shared: &Shared, templates: &[(String, String)]) -> Result<(), StartError> {
    let now = shared.clock.now();
    for (name, path) in templates {
        let err = |message: String| StartError::Template {
            name: name.clone(),
            path: path.clone(),
            message,
        };
        let body = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let parsed = Template::parse(&body).map_err(|e| err(e.to_string()))?;
        shared.write(|reg| {
            let entry = reg
                .templates
                .entry(name.clone())
                .or_insert_with(|| ProvisioningTemplate {
                    name: name.clone(),
                    body: body.clone(),
                    enabled: true,
                    description: None,
                    role_arn: Some(format!(
                        "arn:aws:iam::{}:role/fake-provisioning-role",
                        shared.settings.account
                    )),
                    hook: None,
                    created_at: now,
                    last_modified_at: now,
                    default_version_id: 1,
                    template_type: "FLEET_PROVISIONING".to_owned(),
                    versions: BTreeMap::from([(
                        1,
                        TemplateVersion {
                            body: body.clone(),
                            created_at: now,
                        },
                    )]),
                    parsed: None,
                });
            if entry.body != body {
                // A changed file is a new default version, as CreateProvisioningTemplateVersion
                // with setAsDefault would make it.
                let id = entry.versions.keys().next_back().copied().unwrap_or(0) + 1;
                entry.versions.insert(
                    id,
                    TemplateVersion {
                        body: body.clone(),
                        created_at: now,
                    },
                );
                entry.body = body.clone();
                entry.default_version_id = id;
                entry.last_modified_at = now;
            }
            entry.enabled = true;
            entry.parsed = Some(parsed);
        });
    }
    Ok(())
}

/// Makes (or reuses) the claim certificate and key of each `--claim NAME=TEMPLATE`.
fn apply_claims(
    shared: &Shared,
    claims: &[(String, String)],
) -> Result<serde_json::Value, StartError> {
    let dir = shared.settings.state_dir.join("claims");
    std::fs::create_dir_all(&dir).map_err(|source| StartError::Claim {
        path: dir.clone(),
        source,
    })?;
    let mut out = serde_json::Map::new();
    for (name, template) in claims {
        if !shared.read(|reg| reg.templates.contains_key(template)) {
            return Err(StartError::ClaimTemplate {
                name: name.clone(),
                template: template.clone(),
            });
        }
        let cert_path = dir.join(format!("{name}.cert.pem"));
        let key_path = dir.join(format!("{name}.key.pem"));
        let existing = std::fs::read_to_string(&cert_path).ok().and_then(|pem| {
            let (der, _, _) = crate::ca::parse_cert_pem(&pem)?;
            let id = crate::ca::certificate_id(&der);
            shared
                .read(|reg| reg.certificates.contains_key(&id))
                .then_some(id)
        });
        let policy_name = format!("fake-claim-{template}");
        let document = claim_policy_document(&shared.settings, template);
        let parsed =
            crate::policy::PolicyDocument::parse(&document).map_err(|e| StartError::Template {
                name: template.clone(),
                path: "claim policy".to_owned(),
                message: e.to_string(),
            })?;
        let now = shared.clock.now();
        let cert_id = match existing {
            Some(id) if key_path.exists() => id,
            _ => {
                let key = crate::ca::new_ec_key()?;
                // A claim baked into an image: valid as long as AWS-issued certificates.
                let issued = shared
                    .ca
                    .issue(&key, now - 60, crate::ca::AWS_DEFAULT_NOT_AFTER)?;
                crate::ca::write_file(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(
                    |source| StartError::Claim {
                        path: key_path.clone(),
                        source,
                    },
                )?;
                crate::ca::write_file(&cert_path, issued.pem.as_bytes(), 0o644).map_err(
                    |source| StartError::Claim {
                        path: cert_path.clone(),
                        source,
                    },
                )?;
                shared.write(|reg| {
                    reg.certificates.insert(
                        issued.id.clone(),
                        Certificate {
                            id: issued.id.clone(),
                            pem: issued.pem.clone(),
                            status: CertStatus::Active,
                            created_at: now,
                            last_modified_at: now,
                            not_before: issued.not_before,
                            not_after: issued.not_after,
                            policies: Default::default(),
                            things: Default::default(),
                            temporary_claim_for: None,
                            customer_version: 1,
                            template: Some(template.clone()),
                        },
                    );
                });
                issued.id
            }
        };
        shared.write(|reg| {
            reg.policies
                .entry(policy_name.clone())
                .or_insert_with(|| Policy {
                    name: policy_name.clone(),
                    document: document.clone(),
                    version_id: 1,
                    created_at: now,
                    parsed: Some(parsed),
                });
            if let Some(c) = reg.certificates.get_mut(&cert_id) {
                c.policies.insert(policy_name.clone());
                // A claim made by an earlier version of the fake did not record it.
                c.template = Some(template.clone());
            }
        });
        out.insert(
            name.clone(),
            json!({"cert": cert_path, "key": key_path, "certificateId": cert_id}),
        );
    }
    Ok(serde_json::Value::Object(out))
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local(l: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    l.local_addr().unwrap_or(fallback)
}

/// A started fake: its ready line, and what `stop` needs.
#[derive(Debug)]
pub struct Running {
    /// The ready line's content: addresses, root CA and claim files.
    pub ready: serde_json::Value,
    pub shared: Arc<Shared>,
    persister: tokio::task::JoinHandle<()>,
    http_task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stops accepting, tells connections, writes the registry, and returns.
    pub async fn stop(self) {
        self.shared.shutdown.cancel();
        let _ = self.persister.await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), self.http_task).await;
    }
}

/// Starts the fake on the current tokio runtime: every listener is bound when this returns.
/// Used by `run` and by other crates' tests that want the fake in-process.
pub async fn start(options: Options) -> Result<Running, StartError> {
    let dir = options.settings.state_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|source| StartError::StateDir {
        path: dir.clone(),
        source,
    })?;
    let registry = load_registry(&dir)?;
    let clock = Arc::new(Clock::default());
    clock.set_offset(registry.clock_offset);
    let ca = Authority::load_or_create(&dir, clock.now(), &options.settings.server_names)?;
    let (chain, key) = ca.server_identity();
    let plain = crate::tls::server_config(clock.clone(), chain.clone(), key.clone_key(), false)?;
    let alpn = crate::tls::server_config(clock.clone(), chain, key, true)?;
    let shared = Arc::new(Shared::new(options.settings.clone(), clock, ca, registry));
    apply_templates(&shared, &options.templates)?;
    let claims = apply_claims(&shared, &options.claims)?;

    let mqtt = bind("the MQTT listener", options.mqtt).await?;
    let mqtt_alpn = bind("the MQTT ALPN listener", options.mqtt_alpn).await?;
    let http = bind("the HTTP listener", options.http).await?;
    let mqtt_addr = local(&mqtt, options.mqtt);
    let alpn_addr = local(&mqtt_alpn, options.mqtt_alpn);
    let http_addr = local(&http, options.http);

    let persister = tokio::spawn(shared.clone().persist_loop());
    tokio::spawn(crate::server::listen(
        shared.clone(),
        mqtt,
        TlsAcceptor::from(plain),
        false,
    ));
    tokio::spawn(crate::server::listen(
        shared.clone(),
        mqtt_alpn,
        TlsAcceptor::from(alpn),
        true,
    ));
    let router = crate::http::router(shared.clone());
    let http_shutdown = shared.shutdown.clone();
    let http_task = tokio::spawn(async move {
        let serve = axum::serve(http, router)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!("HTTP server: {e}");
        }
    });

    let ready = json!({
        "mqtt": mqtt_addr.to_string(),
        "mqttAlpn": alpn_addr.to_string(),
        "http": format!("http://{http_addr}"),
        "rootCa": shared.ca.root_path(),
        "claims": claims,
    });
    Ok(Running {
        ready,
        shared,
        persister,
        http_task,
    })
}

/// Runs the fake until SIGTERM or SIGINT, printing the ready line on stdout once it is ready.
pub async fn run(options: Options) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first, so that a SIGTERM right after the ready line is not lost.
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let running = start(options).await?;
    {
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", running.ready);
        let _ = stdout.flush();
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    running.stop().await;
    Ok(())
}
