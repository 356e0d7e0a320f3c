//! The part of Avahi's D-Bus API (`org.freedesktop.Avahi` on the system bus, avahi-daemon 0.7
//! and later) that announcing and browsing `_iotd-onboard._tcp` share: names, the values of
//! Avahi's headers (`avahi-common/defs.h`) and how its errors read. The interfaces are
//! described in `/usr/share/dbus-1/interfaces/org.freedesktop.Avahi.*.xml`.
//!
//! iotd calls Avahi with plain method calls and match rules (`discovery`) rather than zbus's
//! generated proxies, whose machinery (property caches, owner tracking) the daemon does not
//! need and would carry in its binary; iotctl keeps its proxies (`iotctl onboard --discover`).

/// Avahi's well-known name on the system bus.
pub const BUS_NAME: &str = "org.freedesktop.Avahi";
/// `org.freedesktop.Avahi.Server`, at [`SERVER_PATH`].
pub const SERVER_INTERFACE: &str = "org.freedesktop.Avahi.Server";
pub const SERVER_PATH: &str = "/";
/// `org.freedesktop.Avahi.EntryGroup`, at the path `EntryGroupNew` answers. Avahi frees the
/// groups of a client that leaves the bus, withdrawing what they announced.
pub const ENTRY_GROUP_INTERFACE: &str = "org.freedesktop.Avahi.EntryGroup";
/// The signal of the server's and of an entry group's state: the state, and Avahi's error text.
pub const STATE_CHANGED: &str = "StateChanged";
/// `AVAHI_IF_UNSPEC`: every interface Avahi serves.
pub const IF_UNSPEC: i32 = -1;
/// `AVAHI_PROTO_UNSPEC`: mDNS over IPv4 and IPv6.
pub const PROTO_UNSPEC: i32 = -1;
/// `AVAHI_PROTO_INET`: mDNS over IPv4 (and, for a resolver's `aprotocol`, an IPv4 address).
pub const PROTO_INET: i32 = 0;
/// `AVAHI_PROTO_INET6`.
pub const PROTO_INET6: i32 = 1;
/// `AVAHI_LOOKUP_RESULT_LOCAL`: the answer comes from this host's own records.
pub const LOOKUP_RESULT_LOCAL: u32 = 8;
/// The D-Bus error Avahi answers when something is not there (`AVAHI_ERR_NOT_FOUND`, also the
/// answer to a resolver whose timeout passed: `Timeout reached` comes as
/// `org.freedesktop.Avahi.TimeoutError`).
pub const TIMEOUT_ERROR: &str = "org.freedesktop.Avahi.TimeoutError";

/// `AvahiServerState`: what the daemon as a whole is doing.
pub mod server_state {
    pub const INVALID: i32 = 0;
    /// Probing and announcing its host name: entry groups wait for `RUNNING`.
    pub const REGISTERING: i32 = 1;
    pub const RUNNING: i32 = 2;
    /// Its host name is taken on the network; it picks another and registers again.
    pub const COLLISION: i32 = 3;
    pub const FAILURE: i32 = 4;

    /// In words, for messages.
    pub fn describe(state: i32) -> &'static str {
        match state {
            INVALID => "it is starting",
            REGISTERING => "it is registering its host name",
            RUNNING => "it is running",
            COLLISION => "its host name is taken on the network, and it is choosing another",
            FAILURE => "it failed",
            _ => "it is in a state this iotd does not know",
        }
    }
}

/// `AvahiEntryGroupState`: where a group of published records stands.
pub mod group_state {
    pub const UNCOMMITED: i32 = 0;
    /// Probing: Avahi checks that nobody else on the network has the name.
    pub const REGISTERING: i32 = 1;
    /// Announced.
    pub const ESTABLISHED: i32 = 2;
    /// Another host has the name: pick another and publish again.
    pub const COLLISION: i32 = 3;
    pub const FAILURE: i32 = 4;
}

/// A D-Bus error in the words to show: Avahi's message (`Timeout reached`, `Not permitted`),
/// else zbus's.
pub fn error_text(error: &zbus::Error) -> String {
    match error {
        zbus::Error::MethodError(name, Some(message), _) => format!("{message} ({name})"),
        zbus::Error::MethodError(name, None, _) => name.to_string(),
        other => other.to_string(),
    }
}

/// Whether the error is Avahi's "nothing answered in time".
pub fn is_timeout(error: &zbus::Error) -> bool {
    matches!(error, zbus::Error::MethodError(name, _, _) if name.as_str() == TIMEOUT_ERROR)
}
