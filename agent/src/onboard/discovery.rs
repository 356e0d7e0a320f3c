//! DNS-SD discovery for trusted-user onboarding: while the onboarding window is open, the
//! gateway is announced on the local network as `_iotd-onboard._tcp` on the onboarding port,
//! with its serial and model in the TXT record (`sn=`, `model=`, and `v=1`), so that an
//! installer's `iotctl onboard --discover` (or a phone app) lists the gateways waiting. The
//! serial on the label stays the authentication's input: the announcement only saves typing an
//! address (§5.1 of the protocol note: the client never takes the serial from the network).
//!
//! iotd publishes through Avahi's D-Bus API on the system bus, as Linux programs do, rather than
//! answering mDNS itself: one responder per host, which owns port 5353, the host name and the
//! conflict resolution. Without Avahi (the name is not on the bus, or there is no bus) the
//! gateway is not announced and onboarding works by address; `iotctl onboarding status` says so.
//!
//! The task reacts to events only, never polls: the core's `View` (the window opens or closes),
//! Avahi's server state (it re-registers everything after a host name change), the entry
//! group's state (a name collision: Avahi proposes another name), and the bus's
//! `NameOwnerChanged` for `org.freedesktop.Avahi` (Avahi starts, stops or restarts). What it
//! does is reported to the core as `Request::Discovery`, for D-Bus `OnboardingDiscovery`.
//!
//! The system bus is the one zbus connects to: `DBUS_SYSTEM_BUS_ADDRESS` when set (tests run a
//! private bus and a private avahi-daemon), else `/run/dbus/system_bus_socket`.

pub mod avahi;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use futures_util::StreamExt as _;
use tokio::sync::{mpsc, watch};
use zbus::{MatchRule, Message, MessageStream, ObjectPath};

use self::avahi::{group_state, server_state};
use crate::bus::{Args, Values, call};
use crate::config::OnboardingSettings;
use crate::onboard::port::{Port, Request, View};

/// The DNS-SD service type (RFC 6763 §7: `_<service>._tcp`; the service name is 13 of the 15
/// characters allowed).
pub const SERVICE_TYPE: &str = "_iotd-onboard._tcp";
/// TXT keys. `v` is the version of this TXT record's format.
pub const TXT_VERSION: &str = "v";
pub const TXT_SERIAL: &str = "sn";
pub const TXT_MODEL: &str = "model";
/// The model announced when neither `onboarding.model` nor the device tree or DMI gives one.
pub const DEFAULT_MODEL: &str = "gateway";
/// Where a model is read when `onboarding.model` is not set: the device tree's (ARM and RISC-V
/// boards: "Raspberry Pi 4 Model B Rev 1.4"), else DMI's product name (x86).
const MODEL_FILES: [&str; 2] = [
    "/sys/firmware/devicetree/base/model",
    "/sys/class/dmi/id/product_name",
];
/// A DNS label, and so a service instance name, is at most 63 bytes (RFC 6763 §4.1.1).
const MAX_INSTANCE_NAME: usize = 63;
/// A TXT record's strings are at most 255 bytes each (RFC 6763 §6.1).
const MAX_TXT_STRING: usize = 255;
/// Read at most this much of a model file: more is not a model.
const MAX_MODEL_FILE: u64 = 4096;

/// What the gateway announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The serial on the label (the onboarding record's).
    pub serial: String,
    /// `None`: announced without `model=`.
    pub model: Option<String>,
    /// Where the onboarding server listens, as bound (the port is the real one).
    pub address: SocketAddr,
}

impl Announcement {
    /// "iotd <serial>", cut to the 63 bytes a service instance name may have; the full serial
    /// is in the TXT record.
    pub fn instance_name(&self) -> String {
        truncate(&format!("iotd {}", self.serial), MAX_INSTANCE_NAME)
    }

    /// `v=1`, `sn=<serial>` and, when known, `model=<model>` (cut to 255 bytes).
    pub fn txt(&self) -> Vec<Vec<u8>> {
        let mut txt = vec![
            format!("{TXT_VERSION}=1"),
            format!("{TXT_SERIAL}={}", self.serial),
        ];
        if let Some(model) = &self.model {
            txt.push(truncate(&format!("{TXT_MODEL}={model}"), MAX_TXT_STRING));
        }
        txt.into_iter().map(String::into_bytes).collect()
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A TXT record's `key=value` strings as a map (RFC 6763 §6.4 and §6.5): keys compared without
/// case (lower-cased here), the first occurrence of a key counts, a string without `=` is a key
/// with an empty value, and an empty key is ignored. Values that are not UTF-8 are shown with
/// replacement characters.
pub fn parse_txt(txt: &[Vec<u8>]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in txt {
        let (key, value) = match entry.iter().position(|&b| b == b'=') {
            Some(at) => (&entry[..at], &entry[at + 1..]),
            None => (&entry[..], &[][..]),
        };
        if key.is_empty() {
            continue;
        }
        let key = String::from_utf8_lossy(key).to_ascii_lowercase();
        out.entry(key)
            .or_insert_with(|| String::from_utf8_lossy(value).into_owned());
    }
    out
}

/// The model to announce: `onboarding.model` when set (a file read or a command run, on a
/// blocking thread), else the device tree's or DMI's, else "gateway". A configured source that
/// fails is logged, and the gateway is announced without a model rather than with a wrong one.
pub async fn model(settings: &OnboardingSettings) -> Option<String> {
    let settings = settings.clone();
    let resolved = tokio::task::spawn_blocking(move || match settings.resolve_model() {
        Ok(Some(model)) => Some(model),
        Ok(None) => Some(default_model(&MODEL_FILES.map(Path::new))),
        Err(e) => {
            tracing::warn!("{e}; announcing the gateway without a model");
            None
        }
    })
    .await;
    resolved.unwrap_or_else(|e| {
        tracing::warn!("resolving onboarding.model: {e}; announcing the gateway without a model");
        None
    })
}

/// The first of `files` that holds a model (trimmed of whitespace and the device tree's NUL),
/// else [`DEFAULT_MODEL`].
fn default_model(files: &[&Path]) -> String {
    files
        .iter()
        .find_map(|path| {
            let mut bytes = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_MODEL_FILE).read_to_end(&mut bytes))
                .ok()?;
            let text = String::from_utf8_lossy(&bytes);
            let model = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
            (!model.is_empty()).then(|| model.to_owned())
        })
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned())
}

/// Announces the gateway while the window is open, for as long as the core runs. Never fails
/// iotd: without Avahi it reports why and waits for Avahi to appear.
pub async fn announce(announcement: Announcement, port: Port) {
    let mut reporter = Reporter {
        requests: port.requests,
        last: String::new(),
    };
    let address = announcement.address;
    if address.ip().is_loopback() {
        let _ = reporter
            .say(format!(
                "off: onboarding listens on {address} (onboarding.listen), which only this \
                 gateway can reach; nothing is announced"
            ))
            .await;
        return;
    }
    let connection = match zbus::Connection::system().await {
        Ok(c) => c,
        Err(e) => {
            let _ = reporter
                .say(format!(
                    "off: there is no system bus to reach Avahi on ({e}); installers reach the \
                     gateway by its address ({address})"
                ))
                .await;
            return;
        }
    };
    let name = announcement.instance_name();
    let mut announcer = Announcer {
        connection,
        announcement,
        name,
        reporter,
        view: port.view,
    };
    if let Err(Ended(why)) = announcer.run().await
        && let Some(why) = why
    {
        let _ = announcer.reporter.say(why).await;
    }
}

/// Why the task stops: the core is gone (`None`: nobody to tell), or the bus connection broke
/// (what to report).
struct Ended(Option<String>);

impl Ended {
    /// A signal stream ended: only the connection closing ends one.
    fn closed() -> Self {
        Ended(Some(
            "off: the system bus connection closed; restart iotd to announce the gateway again"
                .to_owned(),
        ))
    }
}

/// Sends the core what discovery does, once per change.
struct Reporter {
    requests: mpsc::Sender<Request>,
    last: String,
}

impl Reporter {
    async fn say(&mut self, detail: String) -> Result<(), Ended> {
        if detail == self.last {
            return Ok(());
        }
        self.last.clone_from(&detail);
        self.requests
            .send(Request::Discovery { detail })
            .await
            .map_err(|_| Ended(None))
    }
}

/// How following one Avahi instance ended.
enum Left {
    /// Avahi's name changed owner (it stopped, or restarted): look again.
    Avahi,
    /// It refused or failed: this is reported, and the next try waits for a new Avahi or a
    /// new window.
    Failed(String),
}

/// One entry group Avahi made for us, and the signals of its state.
struct Group {
    path: ObjectPath<'static>,
    states: MessageStream,
    /// Avahi made sure nobody else has the name, and announced it.
    established: bool,
    /// The interface it is announced on (its name), when not every interface.
    interface: Option<String>,
}

/// What woke the announcer.
enum Event {
    /// The window's view changed.
    View,
    /// Avahi's bus name changed owner.
    Owner,
    /// Avahi's server state.
    Server(i32),
    /// The entry group's state and Avahi's error text.
    Group(i32, String),
}

struct Announcer {
    connection: zbus::Connection,
    announcement: Announcement,
    /// The instance name: "iotd <serial>", or Avahi's alternative after a collision.
    name: String,
    reporter: Reporter,
    view: watch::Receiver<View>,
}

impl Announcer {
    /// Follows Avahi's comings and goings until the core is gone.
    async fn run(&mut self) -> Result<(), Ended> {
        let address = self.announcement.address;
        let lost = |e: zbus::Error| {
            Ended(Some(format!(
                "off: talking to the system bus failed ({e}); installers reach the gateway by \
                 its address ({address})"
            )))
        };
        // Subscribed before asking whether Avahi is there, so that a start in between is seen.
        let owners = MatchRule::builder()
            .path(DBUS_PATH)
            .interface(DBUS_NAME)
            .member("NameOwnerChanged")
            .arg(0, avahi::BUS_NAME);
        let mut owners = subscribe(&self.connection, DBUS_NAME, owners)
            .await
            .map_err(lost)?;
        loop {
            let present = call(
                &self.connection,
                DBUS_NAME,
                DBUS_PATH,
                DBUS_NAME,
                "NameHasOwner",
                Args::new((avahi::BUS_NAME,)),
            )
            .await
            .and_then(|reply| reply.get::<bool>(0))
            .map_err(lost)?;
            let left = if present {
                self.follow(&mut owners).await?
            } else {
                Left::Failed(format!(
                    "off: Avahi is not running (no {} on the system bus); installers reach the \
                     gateway by its address ({address})",
                    avahi::BUS_NAME
                ))
            };
            if let Left::Failed(detail) = left {
                self.reporter.say(detail).await?;
                // Without Avahi only its start changes anything; after a failure, a new
                // window tries again too.
                self.wait_for_avahi(&mut owners, present).await?;
            }
        }
    }

    /// Waits for Avahi's name to change owner, or (`or_new_window`) for a window to open.
    async fn wait_for_avahi(
        &mut self,
        owners: &mut MessageStream,
        or_new_window: bool,
    ) -> Result<(), Ended> {
        let mut was_open = self.view.borrow_and_update().open;
        loop {
            if let Event::Owner = next_event(&mut self.view, owners, None, None).await? {
                return Ok(());
            }
            let open = self.view.borrow_and_update().open;
            if or_new_window && open && !was_open {
                return Ok(());
            }
            was_open = open;
        }
    }

    /// Publishes while the window is open and Avahi runs, until Avahi goes away or fails; the
    /// group is withdrawn however it ends.
    async fn follow(&mut self, owners: &mut MessageStream) -> Result<Left, Ended> {
        let mut group = None;
        let outcome = self.publish_while_open(owners, &mut group).await;
        if let Some(old) = group {
            withdraw(&self.connection, old).await;
        }
        outcome
    }

    async fn publish_while_open(
        &mut self,
        owners: &mut MessageStream,
        group: &mut Option<Group>,
    ) -> Result<Left, Ended> {
        // Subscribed before reading the state, so that no change in between is lost.
        let server = MatchRule::builder()
            .path(avahi::SERVER_PATH)
            .interface(avahi::SERVER_INTERFACE)
            .member(avahi::STATE_CHANGED);
        let mut server_states = match subscribe(&self.connection, avahi::BUS_NAME, server).await {
            Ok(s) => s,
            Err(e) => return Ok(self.failed("subscribing to Avahi's state", &e)),
        };
        let mut state = match self
            .server("GetState", Args::NONE)
            .await
            .and_then(|reply| reply.get::<i32>(0))
        {
            Ok(s) => s,
            Err(e) => return Ok(self.failed("asking Avahi for its state", &e)),
        };
        // Set after a name collision: the group under the old name goes, one under the new
        // name follows.
        let mut renamed = false;
        loop {
            let open = self.view.borrow_and_update().open;
            // Avahi's rule: a group registered before a host name change must be withdrawn,
            // and published again once the server runs.
            let wanted = open && state == server_state::RUNNING;
            if (!wanted || renamed)
                && let Some(old) = group.take()
            {
                withdraw(&self.connection, old).await;
            }
            renamed = false;
            if wanted
                && group.is_none()
                && let Err(left) = Box::pin(self.publish(group)).await
            {
                return Ok(left);
            }
            self.reporter.say(self.detail(open, state, group)).await?;
            let states = group.as_mut().map(|g| &mut g.states);
            match next_event(&mut self.view, owners, Some(&mut server_states), states).await? {
                Event::View => {}
                Event::Owner => return Ok(Left::Avahi),
                Event::Server(new) => state = new,
                Event::Group(group_state::ESTABLISHED, _) => {
                    if let Some(g) = group {
                        g.established = true;
                    }
                }
                Event::Group(group_state::COLLISION, _) => {
                    // Another device has the name: a second gateway with this serial, or a
                    // different service that chose the same words. Avahi proposes the next
                    // name ("iotd GW-1 #2").
                    let alternative = match self
                        .server(
                            "GetAlternativeServiceName",
                            Args::new((self.name.as_str(),)),
                        )
                        .await
                        .and_then(|reply| reply.get::<String>(0))
                    {
                        Ok(n) => n,
                        Err(e) => {
                            return Ok(self.failed("asking Avahi for another service name", &e));
                        }
                    };
                    tracing::warn!(
                        "onboarding discovery: another device on the network announces \
                         {:?}; announcing as {alternative:?} instead (is there another gateway \
                         with serial {}?)",
                        self.name,
                        self.announcement.serial
                    );
                    self.name = alternative;
                    renamed = true;
                }
                Event::Group(group_state::FAILURE, error) => {
                    return Ok(Left::Failed(format!(
                        "off: Avahi could not announce {:?} ({error}); installers reach the \
                         gateway by its address ({}); the next window tries again",
                        self.name, self.announcement.address
                    )));
                }
                Event::Group(..) => {}
            }
        }
    }

    /// Makes an entry group with the service and commits it; Avahi then probes the name and
    /// announces it (the group's state says when). The group is in `slot` as soon as it
    /// exists, so that it is withdrawn when Avahi refuses the service.
    async fn publish(&self, slot: &mut Option<Group>) -> Result<(), Left> {
        let address = self.announcement.address;
        let (interface, protocol, interface_name) = match address.ip() {
            // Listening on every address: announced on every interface Avahi serves, over
            // IPv4 only when only IPv4 is listened on ("0.0.0.0"), so that an installer never
            // resolves the gateway to an address family it does not listen on.
            IpAddr::V4(ip) if ip.is_unspecified() => (avahi::IF_UNSPEC, avahi::PROTO_INET, None),
            IpAddr::V6(ip) if ip.is_unspecified() => (avahi::IF_UNSPEC, avahi::PROTO_UNSPEC, None),
            ip => {
                let (interface, protocol, name) = self.interface_of(ip).await?;
                (interface, protocol, Some(name))
            }
        };
        let path = self
            .server("EntryGroupNew", Args::NONE)
            .await
            .and_then(|reply| reply.get::<ObjectPath<'_>>(0).map(ObjectPath::into_owned))
            .map_err(|e| self.failed("asking Avahi for an entry group", &e))?;
        // Before the commit: the group's first state change comes after it.
        let states = MatchRule::builder()
            .path(path.as_str())
            .interface(avahi::ENTRY_GROUP_INTERFACE)
            .member(avahi::STATE_CHANGED);
        let states = subscribe(&self.connection, avahi::BUS_NAME, states)
            .await
            .map_err(|e| self.failed("subscribing to the entry group's state", &e))?;
        let group = slot.insert(Group {
            path,
            states,
            established: false,
            interface: interface_name,
        });
        let group = group.path.as_str();
        let added = call(
            &self.connection,
            avahi::BUS_NAME,
            group,
            avahi::ENTRY_GROUP_INTERFACE,
            "AddService",
            Args::new((
                interface,
                protocol,
                0u32,
                self.name.as_str(),
                SERVICE_TYPE,
                "",
                "",
                address.port(),
                self.announcement.txt(),
            )),
        )
        .await;
        let committed = match added {
            Ok(_) => {
                call(
                    &self.connection,
                    avahi::BUS_NAME,
                    group,
                    avahi::ENTRY_GROUP_INTERFACE,
                    "Commit",
                    Args::NONE,
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            return Err(self.failed(&format!("Avahi refused the service {:?}", self.name), &e));
        }
        tracing::info!(
            name = %self.name,
            port = address.port(),
            "onboarding discovery: publishing {SERVICE_TYPE} through Avahi"
        );
        Ok(())
    }

    /// The interface that carries `ip`, its mDNS protocol and its name: the gateway is
    /// announced there only, so that it is not announced where it does not listen. Avahi itself
    /// says which interface carries the address: it publishes each interface's addresses on
    /// that interface, and answers for its own records at once.
    async fn interface_of(&self, ip: IpAddr) -> Result<(i32, i32, String), Left> {
        let address = self.announcement.address;
        let protocol = match ip {
            IpAddr::V4(_) => avahi::PROTO_INET,
            IpAddr::V6(_) => avahi::PROTO_INET6,
        };
        let found = self
            .server(
                "ResolveAddress",
                Args::new((avahi::IF_UNSPEC, protocol, ip.to_string(), 0u32)),
            )
            .await
            .and_then(|reply| {
                // Interface, protocol, address protocol, address, host name, flags. For another
                // host's address, its name is reported.
                let other = if reply.get::<u32>(5)? & avahi::LOOKUP_RESULT_LOCAL != 0 {
                    None
                } else {
                    Some(reply.get::<String>(4)?)
                };
                Ok((reply.get::<i32>(0)?, other))
            });
        let interface = match found {
            Ok((interface, None)) => interface,
            Ok((_, Some(host))) => {
                return Err(Left::Failed(format!(
                    "off: {ip} (onboarding.listen) belongs to {host}, not to this gateway, as \
                     Avahi sees it; nothing is announced"
                )));
            }
            Err(e) => {
                let why = if avahi::is_timeout(&e) {
                    "no interface Avahi serves has it".to_owned()
                } else {
                    avahi::error_text(&e)
                };
                return Err(Left::Failed(format!(
                    "off: Avahi does not announce {ip} (onboarding.listen) as this gateway's \
                     ({why}), so the gateway is not announced; installers reach it at {address}"
                )));
            }
        };
        let name = self
            .server("GetNetworkInterfaceNameByIndex", Args::new((interface,)))
            .await
            .and_then(|reply| reply.get::<String>(0))
            .unwrap_or_else(|_| format!("interface {interface}"));
        Ok((interface, protocol, name))
    }

    /// Calls `method` of Avahi's server.
    fn server<'a>(
        &'a self,
        method: &'a str,
        args: Args<'a>,
    ) -> impl Future<Output = zbus::Result<Values>> + 'a {
        call(
            &self.connection,
            avahi::BUS_NAME,
            avahi::SERVER_PATH,
            avahi::SERVER_INTERFACE,
            method,
            args,
        )
    }

    /// Avahi failed at `action`: reported, and the next try waits.
    fn failed(&self, action: &str, e: &zbus::Error) -> Left {
        Left::Failed(format!(
            "off: {action}: {}; installers reach the gateway by its address ({})",
            avahi::error_text(e),
            self.announcement.address
        ))
    }

    /// What `OnboardingDiscovery` says now.
    fn detail(&self, open: bool, state: i32, group: &Option<Group>) -> String {
        let port = self.announcement.address.port();
        let service = format!("{SERVICE_TYPE} {:?} on port {port}", self.name);
        let on = match group.as_ref().and_then(|g| g.interface.as_deref()) {
            Some(interface) => format!(" on {interface}"),
            None => String::new(),
        };
        match group {
            Some(g) if g.established => {
                format!("announced as {service}{on} (while the window is open)")
            }
            Some(_) => format!(
                "announcing as {service}{on} (Avahi is making sure nobody else on the network \
                 has the name)"
            ),
            None if !open => format!(
                "not announced while the window is closed; announced as {service} through \
                 Avahi while it is open"
            ),
            None => format!(
                "waiting for Avahi to announce {service}: {}",
                server_state::describe(state)
            ),
        }
    }
}

/// The bus itself: its name, which is also its interface's, and its path.
const DBUS_NAME: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";

/// The signals `rule` (without its sender and type) selects, from `sender`.
async fn subscribe(
    connection: &zbus::Connection,
    sender: &str,
    rule: zbus::match_rule::Builder<'_>,
) -> zbus::Result<MessageStream> {
    let rule = rule
        .msg_type(zbus::message::Type::Signal)
        .sender(sender)
        .build()?;
    // Boxed: subscribing holds zbus's bookkeeping (2 KB), which every future awaiting this one
    // would otherwise carry for as long as the task runs.
    Box::pin(MessageStream::for_match_rule(rule, connection, None)).await
}

/// The next thing that happened: the view changed, Avahi's name changed owner, or (when
/// followed) the server's or the group's state changed. `Err` when the core is gone or the bus
/// connection closed.
async fn next_event(
    view: &mut watch::Receiver<View>,
    owners: &mut MessageStream,
    mut server: Option<&mut MessageStream>,
    mut group: Option<&mut MessageStream>,
) -> Result<Event, Ended> {
    /// Which stream a message came from.
    enum Source {
        Owners,
        Server,
        Group,
    }
    loop {
        let (source, message) = tokio::select! {
            changed = view.changed() => {
                return match changed {
                    Ok(()) => Ok(Event::View),
                    Err(_) => Err(Ended(None)),
                };
            }
            message = owners.next() => (Source::Owners, message),
            message = next_message(&mut server) => (Source::Server, message),
            message = next_message(&mut group) => (Source::Group, message),
        };
        let message = match message {
            Some(Ok(message)) => message,
            // A message the connection could not read: the stream ends next if it is gone.
            Some(Err(_)) => continue,
            None => return Err(Ended::closed()),
        };
        let from_server = match source {
            Source::Owners => return Ok(Event::Owner),
            Source::Server => true,
            Source::Group => false,
        };
        // A state signal whose arguments are not Avahi's (state, error) is not one to act on.
        let values = Values::of(&message);
        let (Ok(state), Ok(error)) = (values.get::<i32>(0), values.get::<String>(1)) else {
            continue;
        };
        return Ok(if from_server {
            Event::Server(state)
        } else {
            Event::Group(state, error)
        });
    }
}

/// The next message of `stream`; never, without one.
async fn next_message(stream: &mut Option<&mut MessageStream>) -> Option<zbus::Result<Message>> {
    match stream {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

/// Removes the group: Avahi sends goodbye packets for what it announced, so browsers forget
/// it within a second rather than at the records' expiry.
async fn withdraw(connection: &zbus::Connection, group: Group) {
    let freed = call(
        connection,
        avahi::BUS_NAME,
        group.path.as_str(),
        avahi::ENTRY_GROUP_INTERFACE,
        "Free",
        Args::NONE,
    )
    .await;
    if let Err(e) = freed {
        // Avahi is gone (it took the group with it) or the group already was.
        tracing::debug!(
            "onboarding discovery: freeing the entry group: {}",
            avahi::error_text(&e)
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn announcement(serial: &str, model: Option<&str>) -> Announcement {
        Announcement {
            serial: serial.to_owned(),
            model: model.map(str::to_owned),
            address: "0.0.0.0:8443".parse().unwrap(),
        }
    }

    #[test]
    fn the_txt_record_carries_version_serial_and_model() {
        let a = announcement("GW-0042", Some("Raspberry Pi 4 Model B"));
        let txt = a.txt();
        assert_eq!(
            txt,
            vec![
                b"v=1".to_vec(),
                b"sn=GW-0042".to_vec(),
                b"model=Raspberry Pi 4 Model B".to_vec()
            ]
        );
        let parsed = parse_txt(&txt);
        assert_eq!(parsed["sn"], "GW-0042");
        assert_eq!(parsed["model"], "Raspberry Pi 4 Model B");
        assert_eq!(announcement("GW-1", None).txt().len(), 2);
    }

    #[test]
    fn long_names_and_models_are_cut_at_character_boundaries() {
        let serial = "S".repeat(64);
        let a = announcement(&serial, Some(&"é".repeat(200)));
        let name = a.instance_name();
        assert_eq!(name.len(), 63);
        assert!(name.starts_with("iotd SSS"));
        let model = &a.txt()[2];
        assert!(model.len() <= 255 && model.len() >= 254, "{}", model.len());
        assert!(std::str::from_utf8(model).is_ok());
        // The full serial is in the TXT record.
        assert_eq!(parse_txt(&a.txt())["sn"], serial);
    }

    #[test]
    fn txt_parsing_follows_rfc_6763() {
        let txt: Vec<Vec<u8>> = [
            &b"SN=first"[..],
            b"sn=second",
            b"flag",
            b"=no-key",
            b"model=a=b",
            b"empty=",
        ]
        .iter()
        .map(|s| s.to_vec())
        .collect();
        let parsed = parse_txt(&txt);
        assert_eq!(parsed["sn"], "first", "keys without case, the first counts");
        assert_eq!(parsed["flag"], "");
        assert_eq!(parsed["model"], "a=b");
        assert_eq!(parsed["empty"], "");
        assert!(!parsed.contains_key(""));
        assert_eq!(parsed.len(), 4);
    }

    #[test]
    fn the_default_model_is_the_first_file_with_one() {
        let dir = tempfile::tempdir().unwrap();
        let dt = dir.path().join("model");
        let dmi = dir.path().join("product_name");
        let missing = dir.path().join("missing");
        std::fs::write(&dt, "Raspberry Pi 4 Model B Rev 1.4\0").unwrap();
        std::fs::write(&dmi, "Standard PC (Q35 + ICH9, 2009)\n").unwrap();
        assert_eq!(
            default_model(&[&missing, &dt, &dmi]),
            "Raspberry Pi 4 Model B Rev 1.4"
        );
        std::fs::write(&dt, " \0").unwrap();
        assert_eq!(
            default_model(&[&dt, &dmi]),
            "Standard PC (Q35 + ICH9, 2009)"
        );
        assert_eq!(default_model(&[&missing]), DEFAULT_MODEL);
    }

    #[tokio::test]
    async fn a_configured_model_is_resolved_and_a_failing_one_is_left_out() {
        let settings = |model| OnboardingSettings {
            serial: None,
            model,
            listen: "0.0.0.0:8443".parse().unwrap(),
            allowed_templates: Vec::new(),
            allowed_endpoints: Vec::new(),
            installer_parameters: Vec::new(),
            page_interfaces: Vec::new(),
            page_shared_interfaces: Vec::new(),
            page_port: crate::config::DEFAULT_PAGE_PORT,
        };
        use crate::config::ParameterSource;
        let command = ParameterSource::Command(vec!["echo".to_owned(), " IoT-GW 3000 ".to_owned()]);
        assert_eq!(
            model(&settings(Some(command))).await.as_deref(),
            Some("IoT-GW 3000")
        );
        let missing = ParameterSource::File("/nonexistent/model".into());
        assert_eq!(model(&settings(Some(missing))).await, None);
    }

    /// A listener on loopback is reported as such at once, without asking any bus.
    #[tokio::test]
    async fn a_loopback_listener_is_never_announced() {
        let (port, mut core) = Port::pair();
        core.view.send_modify(|v| v.open = true);
        let mut a = announcement("GW-1", None);
        a.address = "127.0.0.1:8443".parse().unwrap();
        let task = tokio::spawn(announce(a, port));
        match core.requests.recv().await {
            Some(Request::Discovery { detail }) => assert!(
                detail.starts_with("off: onboarding listens on 127.0.0.1:8443"),
                "{detail}"
            ),
            other => panic!("no discovery report: {other:?}"),
        }
        // Nothing to follow: the task ends.
        task.await.unwrap();
    }
}
