//! `iotctl onboard --discover`: the gateways on the local network whose onboarding window is
//! open. They announce `_iotd-onboard._tcp` over DNS-SD (iotd's `onboard::discovery`); iotctl
//! browses for it through Avahi's D-Bus API on the system bus, the way Linux programs use mDNS
//! (one responder per computer, which owns port 5353), and resolves each service to its host,
//! address, port and TXT record (`sn=`, `model=`).
//!
//! Browsing lasts `--for` (3 s by default): a gateway that is announced answers a query within a
//! second on a quiet network, and one whose window closes meanwhile sends goodbye packets, so
//! what is listed is what was announced at the end. Each service is resolved as soon as it is
//! seen, over the mDNS protocol it was seen on (so that its address is of the family the
//! gateway announced); resolutions still under way at the end get 2 s more.
//!
//! Exit codes: 0 at least one gateway listed, 1 none (or browsing failed), 3 Avahi not
//! reachable (`cli::ONBOARD_EXIT_CODES_HELP`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use iotd::onboard::discovery::avahi;
use iotd::onboard::discovery::{SERVICE_TYPE, TXT_MODEL, TXT_SERIAL, parse_txt};
use serde_json::json;
use tokio::task::JoinSet;
use zbus::OwnedObjectPath;
use zbus::export::futures_core::Stream;

use crate::exit;

/// The `flags` of a resolver that wants the TXT record too (none: Avahi resolves it by default).
const LOOKUP_DEFAULT: u32 = 0;
/// `org.freedesktop.Avahi.ServiceBrowser`, for match rules.
const SERVICE_BROWSER_INTERFACE: &str = "org.freedesktop.Avahi.ServiceBrowser";

/// What `ResolveService` answers: interface, protocol, name, type, domain, host, address
/// protocol, address, port, TXT strings, flags.
type ResolvedService = (
    i32,
    i32,
    String,
    String,
    String,
    String,
    i32,
    String,
    u16,
    Vec<Vec<u8>>,
    u32,
);

/// What browsing needs of `org.freedesktop.Avahi.Server` at `/`. The proxies live here, not
/// beside Avahi's names and values in `iotd::onboard::discovery::avahi`: iotd, whose binary has a
/// size budget, calls Avahi without zbus's proxy machinery.
#[zbus::proxy(
    interface = "org.freedesktop.Avahi.Server",
    default_service = "org.freedesktop.Avahi",
    default_path = "/"
)]
trait Server {
    fn get_network_interface_name_by_index(&self, index: i32) -> zbus::Result<String>;
    fn service_browser_new(
        &self,
        interface: i32,
        protocol: i32,
        service_type: &str,
        domain: &str,
        flags: u32,
    ) -> zbus::Result<OwnedObjectPath>;
    /// Resolves a browsed service to its host, address, port and TXT record; Avahi gives up
    /// after about 5 s (`org.freedesktop.Avahi.TimeoutError`).
    #[allow(clippy::too_many_arguments)]
    fn resolve_service(
        &self,
        interface: i32,
        protocol: i32,
        name: &str,
        service_type: &str,
        domain: &str,
        aprotocol: i32,
        flags: u32,
    ) -> zbus::Result<ResolvedService>;
}

/// `org.freedesktop.Avahi.ServiceBrowser`, at the path `ServiceBrowserNew` answers. Its
/// signals (`ItemNew`, `ItemRemove`, `AllForNow`, `CacheExhausted`, `Failure`) start as soon as
/// it is made, before a proxy could subscribe: iotctl subscribes to them by a match rule first
/// ([`browser_signals`]).
#[zbus::proxy(
    interface = "org.freedesktop.Avahi.ServiceBrowser",
    default_service = "org.freedesktop.Avahi"
)]
trait ServiceBrowser {
    fn free(&self) -> zbus::Result<()>;
}

/// The signals of every service browser Avahi runs, subscribed before one is made so that none
/// of its first signals is lost; filter them by the browser's path.
async fn browser_signals(connection: &zbus::Connection) -> zbus::Result<zbus::MessageStream> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(avahi::BUS_NAME)
        .interface(SERVICE_BROWSER_INTERFACE)
        .build()?;
    zbus::MessageStream::for_match_rule(rule, connection, None).await
}

/// After browsing, how long the resolutions under way may still take.
const RESOLVE_GRACE: Duration = Duration::from_secs(2);
/// How long the calls before and after browsing (asking the bus, making and freeing the
/// browser) may take together: Avahi answers them at once unless it hangs.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A service as the browser reported it: where Avahi saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Item {
    interface: i32,
    protocol: i32,
    name: String,
    domain: String,
}

/// A gateway waiting, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Gateway {
    /// The service instance name ("iotd GW-0042").
    name: String,
    /// `sn=`; `None` when the TXT record has none.
    serial: Option<String>,
    model: Option<String>,
    /// The host name (`gw-0042.local`).
    host: String,
    /// The address (an IPv6 link-local one with `%interface`).
    address: String,
    port: u16,
    /// The interface of this computer it was found on.
    interface: String,
    txt: BTreeMap<String, String>,
}

impl Gateway {
    /// `address:port`, with an IPv6 address in brackets: what `iotctl onboard` takes.
    fn address_port(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "serial": self.serial,
            "model": self.model,
            "host": self.host,
            "port": self.port,
            "address": self.address,
            "interface": self.interface,
            "name": self.name,
            "txt": self.txt,
        })
    }
}

/// Why nothing could be listed.
#[derive(Debug)]
struct Stop {
    exit: u8,
    result: &'static str,
    message: String,
}

impl Stop {
    fn unreachable(message: String) -> Self {
        Self {
            exit: exit::NOT_REACHABLE,
            result: "unreachable",
            message,
        }
    }

    fn failed(message: String) -> Self {
        Self {
            exit: exit::FAILURE,
            result: "failed",
            message,
        }
    }
}

/// Runs `iotctl onboard --discover` and returns its exit code (the outcome is printed).
pub async fn run(duration: Duration, json: bool) -> u8 {
    let limit = duration + RESOLVE_GRACE + SETUP_TIMEOUT;
    let outcome = tokio::time::timeout(limit, discover(duration))
        .await
        .unwrap_or_else(|_| {
            Err(Stop::failed(format!(
                "Avahi did not answer within {} s; check it with systemctl status avahi-daemon",
                limit.as_secs()
            )))
        });
    match outcome {
        Ok((gateways, notes)) => {
            for note in &notes {
                eprintln!("iotctl: {note}");
            }
            let found = !gateways.is_empty();
            let code = if found { exit::OK } else { exit::FAILURE };
            let none = format!(
                "no gateway announced {SERVICE_TYPE} within {} s: none on this network has its \
                 onboarding window open, or multicast does not reach it (give its address \
                 instead: iotctl onboard HOST …)",
                duration.as_secs()
            );
            if json {
                let mut result = json!({
                    "result": if found { "found" } else { "none" },
                    "exit_code": code,
                    "gateways": gateways.iter().map(Gateway::json).collect::<Vec<_>>(),
                });
                if !found {
                    result["message"] = json!(none);
                }
                println!("{result}");
            } else if found {
                print!("{}", table(&gateways));
            }
            if !found {
                eprintln!("iotctl: {none}");
            }
            code
        }
        Err(stop) => {
            eprintln!("iotctl: {}", stop.message);
            if json {
                println!(
                    "{}",
                    json!({
                        "result": stop.result,
                        "exit_code": stop.exit,
                        "message": stop.message,
                        "gateways": [],
                    })
                );
            }
            stop.exit
        }
    }
}

/// The gateways as a table: serial, model, host:port, address:port.
fn table(gateways: &[Gateway]) -> String {
    let rows: Vec<[String; 4]> = gateways
        .iter()
        .map(|g| {
            [
                g.serial.clone().unwrap_or_else(|| "-".to_owned()),
                g.model.clone().unwrap_or_else(|| "-".to_owned()),
                format!("{}:{}", g.host, g.port),
                g.address_port(),
            ]
        })
        .collect();
    let header = ["SERIAL", "MODEL", "HOST:PORT", "ADDRESS"].map(str::to_owned);
    let mut widths = [0; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Browses for `duration` and resolves what it finds; also returns remarks for standard error
/// (services seen that did not resolve).
async fn discover(duration: Duration) -> Result<(Vec<Gateway>, Vec<String>), Stop> {
    let connection = zbus::Connection::system().await.map_err(|e| {
        Stop::unreachable(format!(
            "there is no system bus to reach Avahi on ({e}); iotctl discovers gateways through \
             avahi-daemon: start it, or give the gateway's address (iotctl onboard HOST …)"
        ))
    })?;
    let failed =
        |action: &str, e: zbus::Error| Stop::failed(format!("{action}: {}", avahi::error_text(&e)));
    let bus = zbus::fdo::DBusProxy::new(&connection)
        .await
        .map_err(|e| failed("talking to the system bus", e))?;
    let name = zbus::names::BusName::try_from(avahi::BUS_NAME)
        .map_err(|e| failed("naming Avahi's bus name", e))?;
    if !bus
        .name_has_owner(name)
        .await
        .map_err(|e| failed("asking the system bus whether Avahi runs", e.into()))?
    {
        return Err(Stop::unreachable(format!(
            "Avahi is not running on this computer (no {} on the system bus); iotctl discovers \
             gateways through avahi-daemon: start it, or give the gateway's address (iotctl \
             onboard HOST …)",
            avahi::BUS_NAME
        )));
    }
    let server = ServerProxy::new(&connection)
        .await
        .map_err(|e| failed("reaching Avahi", e))?;
    // Subscribed before the browser exists: its first signals come at once.
    let mut signals = browser_signals(&connection)
        .await
        .map_err(|e| failed("subscribing to Avahi's browser signals", e))?;
    let path = server
        .service_browser_new(avahi::IF_UNSPEC, avahi::PROTO_UNSPEC, SERVICE_TYPE, "", 0)
        .await
        .map_err(|e| failed(&format!("asking Avahi to browse for {SERVICE_TYPE}"), e))?;
    let browser = ServiceBrowserProxy::builder(&connection)
        .path(path.clone())
        .build()
        .await
        .map_err(|e| failed("addressing Avahi's service browser", e))?;

    let mut present = BTreeSet::new();
    let mut resolved: BTreeMap<Item, Result<ResolvedService, zbus::Error>> = BTreeMap::new();
    let mut resolving: JoinSet<(Item, Result<ResolvedService, zbus::Error>)> = JoinSet::new();
    let deadline = tokio::time::Instant::now() + duration;
    let browsed: Result<(), Stop> = loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => break Ok(()),
            message = next(&mut signals) => {
                let Some(message) = message else {
                    break Err(Stop::failed(
                        "browsing through Avahi: the system bus connection closed".to_owned(),
                    ));
                };
                let Ok(message) = message else { continue };
                let header = message.header();
                if header.path().map(|p| p.as_str()) != Some(path.as_str()) {
                    continue;
                }
                let member = header.member().map(|m| m.as_str().to_owned()).unwrap_or_default();
                match member.as_str() {
                    "ItemNew" | "ItemRemove" => {
                        let Ok((interface, protocol, name, _type, domain, _flags)) = message
                            .body()
                            .deserialize::<(i32, i32, String, String, String, u32)>()
                        else {
                            continue;
                        };
                        let item = Item { interface, protocol, name, domain };
                        if member == "ItemRemove" {
                            present.remove(&item);
                            resolved.remove(&item);
                        } else if present.insert(item.clone()) {
                            let server = server.clone();
                            resolving.spawn(async move {
                                // The address of the family the gateway was announced over.
                                let answer = server
                                    .resolve_service(
                                        item.interface,
                                        item.protocol,
                                        &item.name,
                                        SERVICE_TYPE,
                                        &item.domain,
                                        item.protocol,
                                        LOOKUP_DEFAULT,
                                    )
                                    .await;
                                (item, answer)
                            });
                        }
                    }
                    "Failure" => {
                        let error = message.body().deserialize::<String>().unwrap_or_default();
                        break Err(Stop::failed(format!(
                            "Avahi could not browse for {SERVICE_TYPE}: {error}"
                        )));
                    }
                    // AllForNow, CacheExhausted: browsing goes on until the deadline, for the
                    // gateways that answer late.
                    _ => {}
                }
            }
            Some(done) = resolving.join_next(), if !resolving.is_empty() => {
                if let Ok((item, answer)) = done {
                    resolved.insert(item, answer);
                }
            }
        }
    };
    if browsed.is_ok() {
        let grace = tokio::time::sleep(RESOLVE_GRACE);
        tokio::pin!(grace);
        while !resolving.is_empty() {
            tokio::select! {
                () = &mut grace => break,
                Some(done) = resolving.join_next() => {
                    if let Ok((item, answer)) = done {
                        resolved.insert(item, answer);
                    }
                }
            }
        }
    }
    resolving.abort_all();
    // Avahi frees it with our connection anyway; freeing it says we are done.
    let _ = browser.free().await;
    browsed?;

    let mut notes = Vec::new();
    let mut by_service: BTreeMap<(String, String), Vec<Gateway>> = BTreeMap::new();
    for item in &present {
        match resolved.remove(item) {
            Some(Ok(answer)) => {
                let gateway = gateway(&server, answer).await;
                by_service
                    .entry((item.name.clone(), item.domain.clone()))
                    .or_default()
                    .push(gateway);
            }
            Some(Err(e)) => notes.push(format!(
                "{:?} is announced but did not resolve: {}",
                item.name,
                avahi::error_text(&e)
            )),
            None => notes.push(format!(
                "{:?} is announced but did not resolve in time",
                item.name
            )),
        }
    }
    // One line per gateway: a gateway seen over IPv4 and IPv6, or on two interfaces, is listed
    // once, by its IPv4 address where it has one.
    let mut gateways: Vec<Gateway> = by_service
        .into_values()
        .filter_map(|mut seen| {
            seen.sort_by_key(|g| g.address.contains(':'));
            seen.into_iter().next()
        })
        .collect();
    gateways.sort_by(|a, b| (&a.serial, &a.name).cmp(&(&b.serial, &b.name)));
    // Two of them with one serial: someone on the network claims a gateway's serial.
    let mut serials = BTreeMap::new();
    for g in &gateways {
        if let Some(serial) = &g.serial {
            *serials.entry(serial.clone()).or_insert(0) += 1;
        }
    }
    for (serial, count) in serials {
        if count > 1 {
            notes.push(format!(
                "{count} devices announce serial {serial}: onboard the one whose label you hold, \
                 by its address; iotctl onboard checks the serial and the code before it sends \
                 anything"
            ));
        }
    }
    Ok((gateways, notes))
}

/// A resolved service as a gateway: TXT fields, and the interface's name.
async fn gateway(server: &ServerProxy<'static>, answer: ResolvedService) -> Gateway {
    let (interface, _protocol, name, _type, _domain, host, _aprotocol, address, port, txt, _) =
        answer;
    let interface_name = server
        .get_network_interface_name_by_index(interface)
        .await
        .unwrap_or_else(|_| format!("interface {interface}"));
    let txt = parse_txt(&txt);
    // A link-local IPv6 address is only reachable through the interface it was found on.
    let address = match address.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) if ip.is_unicast_link_local() => format!("{ip}%{interface_name}"),
        _ => address,
    };
    Gateway {
        name,
        serial: txt.get(TXT_SERIAL).cloned(),
        model: txt.get(TXT_MODEL).cloned(),
        host,
        address,
        port,
        interface: interface_name,
        txt,
    }
}

async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx: &mut Context<'_>| Pin::new(&mut *stream).poll_next(cx)).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gateway(serial: Option<&str>, model: &str, address: &str) -> Gateway {
        Gateway {
            name: format!("iotd {}", serial.unwrap_or("?")),
            serial: serial.map(str::to_owned),
            model: Some(model.to_owned()),
            host: "gw.local".to_owned(),
            address: address.to_owned(),
            port: 8443,
            interface: "eth0".to_owned(),
            txt: BTreeMap::new(),
        }
    }

    #[test]
    fn the_table_has_one_aligned_line_per_gateway() {
        let table = table(&[
            gateway(Some("GW-0042"), "Raspberry Pi 4 Model B", "10.0.0.7"),
            gateway(None, "x", "fe80::1%eth0"),
        ]);
        assert_eq!(
            table,
            "SERIAL   MODEL                   HOST:PORT      ADDRESS\n\
             GW-0042  Raspberry Pi 4 Model B  gw.local:8443  10.0.0.7:8443\n\
             -        x                       gw.local:8443  [fe80::1%eth0]:8443\n"
        );
    }

    #[test]
    fn discovery_lasts_one_second_to_five_minutes() {
        use crate::cli::discover_duration;
        assert_eq!(discover_duration("3s"), Ok(3));
        assert_eq!(discover_duration("5"), Ok(5));
        assert_eq!(discover_duration("5m"), Ok(300));
        for bad in ["0", "6m", "301", "soon", ""] {
            assert!(discover_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn discover_is_its_own_mode_of_onboard() {
        use clap::Parser as _;
        let parse = |args: &[&str]| crate::cli::Cli::try_parse_from(args);
        let cli = parse(&["iotctl", "onboard", "--discover", "--for", "5s", "--json"]).unwrap();
        let crate::cli::Command::Onboard(args) = cli.command else {
            panic!("not onboard");
        };
        assert!(args.discover && args.json);
        assert_eq!(args.discover_for, 5);
        let cli = parse(&["iotctl", "onboard", "--discover"]).unwrap();
        let crate::cli::Command::Onboard(args) = cli.command else {
            panic!("not onboard");
        };
        assert_eq!(args.discover_for, 3);
        // Not with the onboarding's own arguments, and --for only with --discover.
        assert!(parse(&["iotctl", "onboard", "--discover", "10.0.0.1"]).is_err());
        assert!(parse(&["iotctl", "onboard", "--discover", "--qr", "IOTD1:A:1"]).is_err());
        assert!(parse(&["iotctl", "onboard", "--for", "5s", "10.0.0.1"]).is_err());
        // Without --discover, onboarding needs its arguments as before.
        assert!(parse(&["iotctl", "onboard"]).is_err());
        assert!(parse(&["iotctl", "onboard", "10.0.0.1", "--qr", "IOTD1:A:1"]).is_err());
        assert!(
            parse(&[
                "iotctl",
                "onboard",
                "10.0.0.1",
                "--qr",
                "IOTD1:A:1",
                "--claim-cert",
                "c",
                "--claim-key",
                "k"
            ])
            .is_ok()
        );
    }
}
