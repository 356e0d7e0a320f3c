//! Starting the onboarding server as one of iotd's supervised tasks: the gateway's verifier
//! record (made by `iotctl onboarding register`), the onboarding key from the key backend, its
//! certificate, and the listening socket; beside it, the installer's page's listeners on the
//! interfaces configured for it (`page`), and the task that announces the server on the local
//! network while the window is open (`discovery`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::config::OnboardingSettings;
use crate::keys::KeyBackend;
use crate::onboard::discovery::{self, Announcement};
use crate::onboard::page::{self, PageInterfaces};
use crate::onboard::port::Port;
use crate::onboard::register::{OnboardingRecord, RegisterError};
use crate::onboard::server::{Limits, Server};

/// The running server.
#[derive(Debug)]
pub struct Running {
    pub address: SocketAddr,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Why the server is not running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No record: the gateway was not registered for onboarding. Not an error for a gateway
    /// that provisions with its image's claim.
    #[error(
        "onboarding is off: this gateway has no onboarding record ({0}); `iotctl onboarding register` makes one"
    )]
    NotRegistered(String),
    #[error("onboarding is off: {0}")]
    Failed(String),
}

/// Starts the onboarding server on `settings.listen` for the core behind `port`, and the
/// discovery task. The discovery task is not supervised: it never ends while the core runs, and
/// what goes wrong with Avahi is reported (`OnboardingDiscovery`), never a reason to stop iotd.
pub async fn start(
    state_dir: &Path,
    settings: &OnboardingSettings,
    backend: Arc<dyn KeyBackend>,
    port: Port,
) -> Result<Running, StartError> {
    let listen = settings.listen;
    let record = match OnboardingRecord::read(&crate::onboard::register::record_path(state_dir)) {
        Ok(record) => record,
        Err(e @ RegisterError::Missing { .. }) => {
            return Err(StartError::NotRegistered(e.to_string()));
        }
        Err(e) => return Err(StartError::Failed(e.to_string())),
    };
    // The key may be in the TPM: its commands block. A key the TPM lost (cleared, new owner)
    // is made anew: the setup code does not depend on it, and the certificate follows it.
    let key = tokio::task::spawn_blocking(move || match backend.onboarding_key() {
        Err(e @ crate::keys::KeyError::Lost { .. }) => {
            tracing::warn!("{e}; making a new onboarding key");
            backend.remove_onboarding_key()?;
            backend.onboarding_key()
        }
        other => other,
    })
    .await
    .map_err(|e| StartError::Failed(format!("loading the onboarding key: {e}")))?
    .map_err(|e| StartError::Failed(e.to_string()))?;
    let tls = crate::onboard::certificate::server_tls(state_dir, key, &record.serial)
        .map_err(StartError::Failed)?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        StartError::Failed(format!(
            "listening on {listen} (onboarding.listen): {e}; choose a free address and port"
        ))
    })?;
    let serial = record.serial.clone();
    let mut server = Server::new(
        listener,
        tls.config,
        &tls.leaf_der,
        record,
        port.clone(),
        Limits::default(),
    )
    .with_installer_parameters(settings.installer_parameters.clone());
    // The installer's page, on the interfaces named for it. Its listeners live as long as the
    // server does: when the server's end of the channel goes, `page::listen` returns.
    if let Some(interfaces) = PageInterfaces::from_settings(settings) {
        let (accepted, connections) = tokio::sync::mpsc::channel(8);
        server = server.with_page(connections);
        tokio::spawn(page::listen(interfaces, accepted));
    }
    let address = server
        .local_addr()
        .map_err(|e| StartError::Failed(format!("reading the onboarding server's address: {e}")))?;
    let task = tokio::spawn(server.run());
    tracing::info!(%address, "onboarding server listening");
    // The model may come from a command (up to 5 s): resolved inside the task, so that the
    // server does not wait for it.
    let settings = settings.clone();
    tokio::spawn(async move {
        let model = discovery::model(&settings).await;
        let announcement = Announcement {
            serial,
            model,
            address,
        };
        discovery::announce(announcement, port).await;
    });
    Ok(Running { address, task })
}
