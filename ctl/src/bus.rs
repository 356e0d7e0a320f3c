//! The commands that talk to the running iotd: `status` (and `--watch`), `rotate`,
//! `reprovision`. Only through `iotd_api::Agent1Proxy` on the system bus
//! (`DBUS_SYSTEM_BUS_ADDRESS` when set).

use std::fmt;
use std::io::{IsTerminal, Write};
use std::pin::Pin;
use std::task::Context;

use anyhow::Context as _;
use iotd_api::{Agent1Proxy, BUS_NAME};
use time::OffsetDateTime;
use zbus::export::futures_core::Stream;
use zbus::proxy::CacheProperties;

use crate::status::{StatusView, render_status, status_json};

/// iotd is not there: exit code 3, so scripts can tell "not running" from "failed".
#[derive(Debug)]
pub struct NotReachable {
    /// Why, when there is more to say than the name being absent (the bus itself is missing).
    pub detail: Option<String>,
}

impl fmt::Display for NotReachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "iotd is not running (no {BUS_NAME} on the system bus)")?;
        if let Some(detail) = &self.detail {
            write!(f, "\n  {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NotReachable {}

/// Refused by iotd's (or the bus's) access policy.
pub const PERMISSION_DENIED: &str = "permission denied: run as root or a member of iotd-admin";

/// Connects to the system bus and makes sure iotd owns its name.
pub async fn connect() -> anyhow::Result<Agent1Proxy<'static>> {
    let connection = zbus::Connection::system().await.map_err(|e| NotReachable {
        detail: Some(format!("connecting to the system bus: {e}")),
    })?;
    // A proxy to an absent name is created happily and fails at the first call with a less
    // clear error; asking the bus first gives the "not running" answer directly.
    let dbus = zbus::fdo::DBusProxy::new(&connection)
        .await
        .context("talking to the system bus")?;
    let name = zbus::names::BusName::try_from(BUS_NAME).context("parsing iotd's bus name")?;
    if !dbus
        .name_has_owner(name)
        .await
        .context("asking the system bus whether iotd runs")?
    {
        return Err(NotReachable { detail: None }.into());
    }
    // No cache: every read asks iotd, so what is printed is what iotd says now.
    Agent1Proxy::builder(&connection)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .context("making the io.iotd.Agent1 proxy")
}

/// Turns a D-Bus error of `action` into what the person at the terminal should read; "iotd
/// went away" becomes `NotReachable`.
pub fn call_error(action: &str, error: zbus::Error) -> anyhow::Error {
    use iotd_api::errors;
    let (name, message) = match &error {
        zbus::Error::MethodError(name, message, _) => (
            name.as_str().to_owned(),
            message.clone().unwrap_or_default(),
        ),
        zbus::Error::FDO(fdo) => {
            let name = match **fdo {
                zbus::fdo::Error::AccessDenied(_) => "org.freedesktop.DBus.Error.AccessDenied",
                zbus::fdo::Error::ServiceUnknown(_) => "org.freedesktop.DBus.Error.ServiceUnknown",
                zbus::fdo::Error::NameHasNoOwner(_) => "org.freedesktop.DBus.Error.NameHasNoOwner",
                _ => "",
            };
            (name.to_owned(), fdo.to_string())
        }
        _ => (String::new(), String::new()),
    };
    match name.as_str() {
        errors::ACCESS_DENIED | "org.freedesktop.DBus.Error.AccessDenied" => {
            anyhow::anyhow!(PERMISSION_DENIED)
        }
        "org.freedesktop.DBus.Error.ServiceUnknown"
        | "org.freedesktop.DBus.Error.NameHasNoOwner" => NotReachable { detail: None }.into(),
        errors::NOT_SUPPORTED => anyhow::anyhow!("{message}"),
        // zbus's Display already includes the cause; chaining it would say it twice.
        "" => anyhow::anyhow!("{action}: {error}"),
        _ if !message.is_empty() => anyhow::anyhow!("{action}: {message}"),
        _ => anyhow::anyhow!("{action}: {name}"),
    }
}

/// Colour only for a person: a terminal, and no NO_COLOR (https://no-color.org).
pub fn use_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

async fn fetch(proxy: &Agent1Proxy<'_>) -> anyhow::Result<StatusView> {
    StatusView::fetch(proxy)
        .await
        .map_err(|e| call_error("reading iotd's properties", e))
}

fn print_view(view: &StatusView, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let text = serde_json::to_string(&status_json(view)).context("serialising the status")?;
        writeln!(out, "{text}")
    } else {
        write!(
            out,
            "{}",
            render_status(view, OffsetDateTime::now_utc(), use_colour())
        )
    }
    .and_then(|()| out.flush())
    .context("writing the status")
}

/// `iotctl status [--json]`.
pub async fn status(json: bool) -> anyhow::Result<()> {
    let proxy = connect().await?;
    let view = fetch(&proxy).await?;
    if json {
        let text =
            serde_json::to_string_pretty(&status_json(&view)).context("serialising the status")?;
        println!("{text}");
        Ok(())
    } else {
        print_view(&view, false)
    }
}

/// The next item of a stream; `None` when it ended. (zbus's streams are `futures_core`
/// streams; this saves a dependency on a futures utility crate for one method.)
async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx: &mut Context<'_>| Pin::new(&mut *stream).poll_next(cx)).await
}

/// `iotctl status --watch`: prints the status, then again at each change iotd announces
/// (PropertiesChanged, or one of its signals). No polling: between changes it only waits.
pub async fn watch(json: bool) -> anyhow::Result<()> {
    let proxy = connect().await?;
    // Subscribe before the first read, so a change between the read and the subscription
    // is not lost.
    let properties = zbus::fdo::PropertiesProxy::builder(proxy.inner().connection())
        .destination(BUS_NAME)
        .path(iotd_api::OBJECT_PATH)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .context("making the properties proxy")?;
    let mut changes = properties
        .receive_properties_changed()
        .await
        .context("subscribing to iotd's property changes")?;
    let mut signals = proxy
        .inner()
        .receive_all_signals()
        .await
        .context("subscribing to iotd's signals")?;
    let mut owner = proxy
        .inner()
        .receive_owner_changed()
        .await
        .context("watching iotd's bus name")?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the Ctrl-C handler")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;

    let clear = !json && std::io::stdout().is_terminal();
    let mut last = None;
    loop {
        let view = match fetch(&proxy).await {
            Ok(v) => v,
            // Once watching, a failed read means iotd left the bus between an event and the
            // read (its name-owner change may arrive after its last PropertiesChanged).
            Err(e) if last.is_some() => {
                return Err(NotReachable {
                    detail: Some(format!("iotd stopped while watching ({e:#})")),
                }
                .into());
            }
            Err(e) => return Err(e),
        };
        // Signals and PropertiesChanged often come together; print each state once.
        if last.as_ref() != Some(&view) {
            if clear {
                // Home and clear: the screen shows the current status, not a scroll of them.
                print!("\x1b[H\x1b[2J");
            } else if last.is_some() && !json {
                println!();
            }
            print_view(&view, json)?;
            last = Some(view);
        }
        tokio::select! {
            change = next(&mut changes) => {
                if change.is_none() {
                    return Err(NotReachable { detail: Some("the bus connection ended".into()) }.into());
                }
            }
            signal = next(&mut signals) => {
                if signal.is_none() {
                    return Err(NotReachable { detail: Some("the bus connection ended".into()) }.into());
                }
            }
            new_owner = next(&mut owner) => {
                if !matches!(new_owner, Some(Some(_))) {
                    return Err(NotReachable { detail: Some("iotd stopped while watching".into()) }.into());
                }
            }
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
    }
}

/// `iotctl rotate [--wait]`: starts a rotation; with `wait`, follows it to its end (iotd's
/// signals) and fails when it failed, was not over within `timeout`, or iotd stopped.
pub async fn rotate(wait: bool, timeout: std::time::Duration) -> anyhow::Result<()> {
    let proxy = connect().await?;
    // Subscribed before asking, so that a rotation that ends at once is not missed.
    let mut rotated = proxy
        .receive_credentials_rotated()
        .await
        .context("subscribing to iotd's CredentialsRotated signal")?;
    let mut failed = proxy
        .receive_rotation_failed()
        .await
        .context("subscribing to iotd's RotationFailed signal")?;
    let mut owner = proxy
        .inner()
        .receive_owner_changed()
        .await
        .context("watching iotd's bus name")?;
    let id = proxy
        .rotate()
        .await
        .map_err(|e| call_error("rotating the certificate", e))?;
    if !wait {
        println!(
            "{id} started: a new key and certificate; iotctl rotate --wait follows it, \
             iotctl status shows where it is"
        );
        return Ok(());
    }
    println!("{id} started: a new key and certificate; waiting for it to end");
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            signal = next(&mut rotated) => {
                let Some(signal) = signal else { break };
                let args = signal.args().context("reading CredentialsRotated")?;
                println!(
                    "{id} committed: connected with certificate {}, valid until {}",
                    args.certificate_id(),
                    crate::status::rfc3339(*args.not_after())
                );
                return Ok(());
            }
            signal = next(&mut failed) => {
                let Some(signal) = signal else { break };
                let args = signal.args().context("reading RotationFailed")?;
                if args.id() == &id {
                    anyhow::bail!(
                        "{id} failed ({}) and was rolled back; the gateway keeps its certificate: {}",
                        args.code(),
                        args.message()
                    );
                }
            }
            new_owner = next(&mut owner) => {
                if !matches!(new_owner, Some(Some(_))) {
                    return Err(NotReachable {
                        detail: Some(format!(
                            "iotd stopped during {id} (a rotation not committed is rolled back when it starts again)"
                        )),
                    }
                    .into());
                }
            }
            () = &mut deadline => anyhow::bail!(
                "{id} did not end within {} s; it goes on in iotd (iotctl status shows where it is)",
                timeout.as_secs()
            ),
        }
    }
    Err(NotReachable {
        detail: Some("the bus connection ended".into()),
    }
    .into())
}

/// `iotctl reprovision`.
pub async fn reprovision() -> anyhow::Result<()> {
    let proxy = connect().await?;
    let message = proxy
        .reprovision()
        .await
        .map_err(|e| call_error("re-provisioning", e))?;
    println!("{message}");
    Ok(())
}

/// `iotctl onboarding open`.
pub async fn open_onboarding(seconds: u32) -> anyhow::Result<()> {
    let proxy = connect().await?;
    let closes_at = proxy
        .open_onboarding(seconds)
        .await
        .map_err(|e| call_error("opening the onboarding window", e))?;
    println!(
        "onboarding window open until {} ({seconds} s); 20 attempts",
        crate::status::rfc3339(closes_at)
    );
    Ok(())
}

/// `iotctl onboarding close`.
pub async fn close_onboarding() -> anyhow::Result<()> {
    let proxy = connect().await?;
    let was_open = proxy
        .close_onboarding()
        .await
        .map_err(|e| call_error("closing the onboarding window", e))?;
    println!(
        "{}",
        if was_open {
            "onboarding window closed"
        } else {
            "the onboarding window was not open; nothing changed"
        }
    );
    Ok(())
}

/// `iotctl onboarding status`.
pub async fn onboarding_status(json: bool) -> anyhow::Result<()> {
    let proxy = connect().await?;
    let read = |e| call_error("reading iotd's onboarding properties", e);
    let open = proxy.onboarding_open().await.map_err(read)?;
    let closes_at = proxy.onboarding_closes_at().await.map_err(read)?;
    let attempts_left = proxy.onboarding_attempts_left().await.map_err(read)?;
    let discovery = proxy.onboarding_discovery().await.map_err(read)?;
    let discovery = if discovery.is_empty() {
        "off: onboarding is off on this gateway".to_owned()
    } else {
        discovery
    };
    if json {
        let value = serde_json::json!({
            "open": open,
            "closesAt": (closes_at > 0).then_some(closes_at),
            "attemptsLeft": attempts_left,
            "discovery": discovery,
        });
        println!("{value}");
        return Ok(());
    }
    let window = match (open, closes_at) {
        (true, 0) => "open while the gateway waits for a claim".to_owned(),
        (true, at) => format!("open until {}", crate::status::rfc3339(at)),
        (false, _) => "closed (iotctl onboarding open opens it)".to_owned(),
    };
    println!("Window:    {window}");
    if open {
        println!("Attempts:  {attempts_left} left");
    }
    println!("Discovery: {discovery}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_reachable_says_what_is_missing() {
        assert_eq!(
            NotReachable { detail: None }.to_string(),
            "iotd is not running (no io.iotd.Agent1 on the system bus)"
        );
    }

    #[test]
    fn io_errors_keep_the_action() {
        let e = call_error(
            "rotating the certificate",
            zbus::Error::InputOutput(std::sync::Arc::new(std::io::Error::other("boom"))),
        );
        assert_eq!(
            format!("{e:#}"),
            "rotating the certificate: I/O error: boom"
        );
    }
}
