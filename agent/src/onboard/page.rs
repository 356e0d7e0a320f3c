//! Where the installer's page is served: plain HTTP on `onboarding.page_port`, only on the
//! interfaces the configuration names (`onboarding.page_interfaces`, direct links; and
//! `onboarding.page_shared_interfaces`, shared networks chosen explicitly).
//!
//! Each interface gets its own listening socket bound to the device (`SO_BINDTODEVICE`, which
//! Linux allows without privilege since 5.7), so the kernel accepts on it only connections that
//! arrive through that interface. Checking the local address instead would not do: Linux
//! accepts a packet for any of its addresses on any interface, so a host on the site network
//! could route to the setup access point's address through the gateway's Ethernet port.
//!
//! Direct links come and go (a USB gadget's interface appears with its function, an access
//! point's with hostapd), and an interface removed and made again has a new index, which a
//! socket bound to the old one never sees. So the listeners follow the interfaces: a netlink
//! socket subscribed to link changes (RTMGRP_LINK) wakes the task, which binds what appeared
//! and drops what went away. Nothing is polled.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::OnboardingSettings;

/// What kind of link a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A direct link to the installer (`onboarding.page_interfaces`).
    Direct,
    /// A shared network the page is served on by choice (`onboarding.page_shared_interfaces`).
    Shared,
}

/// A connection accepted on one of the page's listeners.
#[derive(Debug)]
pub struct Accepted {
    pub tcp: tokio::net::TcpStream,
    pub peer: SocketAddr,
    pub link: Link,
}

/// The interfaces to serve the page on, and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageInterfaces {
    pub interfaces: Vec<(String, Link)>,
    pub port: u16,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Direct => "direct",
            Link::Shared => "shared",
        }
    }
}

impl PageInterfaces {
    /// From the configuration; `None` when no interface is named (the page is not served).
    pub fn from_settings(settings: &OnboardingSettings) -> Option<Self> {
        // The configuration refuses a name in both lists.
        let direct = settings
            .page_interfaces
            .iter()
            .map(|n| (n.clone(), Link::Direct));
        let shared = settings
            .page_shared_interfaces
            .iter()
            .map(|n| (n.clone(), Link::Shared));
        let interfaces: Vec<_> = direct.chain(shared).collect();
        (!interfaces.is_empty()).then_some(Self {
            interfaces,
            port: settings.page_port,
        })
    }
}

/// One interface's listener, and its last problem (logged once, not at every link change).
#[derive(Default)]
struct Slot {
    /// The interface's index when it was bound, and the task accepting on it.
    bound: Option<(u32, Bound)>,
    problem: Option<String>,
}

/// The task accepting on one interface; stopped when dropped.
struct Bound(JoinHandle<()>);

impl Drop for Bound {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the page's listeners until `accepted`'s receiver is gone: binds each configured
/// interface that exists, and re-binds as interfaces appear, disappear or are made again.
pub async fn listen(page: PageInterfaces, accepted: mpsc::Sender<Accepted>) {
    let mut links = match LinkChanges::open() {
        Ok(links) => Some(links),
        Err(error) => {
            tracing::warn!(
                "onboarding page: watching network interfaces (netlink): {error}; the page is \
                 served on the interfaces there are now, and not on one that appears later"
            );
            None
        }
    };
    let probe = match probe_socket() {
        Ok(probe) => probe,
        Err(error) => {
            tracing::error!(
                "onboarding page: opening a socket to look up interfaces: {error}; the page is not served"
            );
            return;
        }
    };
    let mut slots: Vec<Slot> = page.interfaces.iter().map(|_| Slot::default()).collect();
    loop {
        for ((name, link), slot) in page.interfaces.iter().zip(&mut slots) {
            let index = rustix::net::netdevice::name_to_index(&probe, name).ok();
            let current = slot.bound.as_ref().map(|(index, _)| *index);
            if current.is_some() && current == index {
                continue;
            }
            if slot.bound.take().is_some() {
                tracing::info!(interface = %name, "onboarding page: the interface went away; no longer served there");
            }
            let problem = match index {
                None => "the interface does not exist (yet)".to_owned(),
                Some(index) => match bind(name, page.port) {
                    Ok(listener) => {
                        tracing::info!(interface = %name, port = page.port, link = link.name(), "onboarding page served");
                        let task =
                            tokio::spawn(accept(listener, *link, name.clone(), accepted.clone()));
                        slot.bound = Some((index, Bound(task)));
                        slot.problem = None;
                        continue;
                    }
                    Err(error) => format!("listening on port {}: {error}", page.port),
                },
            };
            if slot.problem.as_ref() != Some(&problem) {
                tracing::warn!(interface = %name, "onboarding page: not served on this interface: {problem}");
                slot.problem = Some(problem);
            }
        }
        let changed = async {
            match &links {
                Some(links) => links.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = changed => {
                // A socket that fails once would fail again at once: it is given up, not
                // read in a loop.
                if let Err(error) = result {
                    tracing::warn!(
                        "onboarding page: reading network interface changes: {error}; interfaces \
                         that appear from now on are not served until iotd restarts"
                    );
                    links = None;
                }
            }
            () = accepted.closed() => return,
        }
    }
}

/// A socket for interface lookups (SIOCGIFINDEX).
fn probe_socket() -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A listener on `port` bound to the interface `name`: IPv6 and IPv4 (one dual-stack socket),
/// or IPv4 alone where the kernel has no IPv6.
fn bind(name: &str, port: u16) -> io::Result<TcpListener> {
    let socket = match TcpSocket::new_v6() {
        Ok(socket) => (socket, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))),
        Err(error) if error.raw_os_error() == Some(EAFNOSUPPORT) => (
            TcpSocket::new_v4()?,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ),
        Err(error) => return Err(error),
    };
    let (socket, address) = socket;
    // Several interfaces share the port: the kernel allows that for sockets bound to different
    // devices. SO_REUSEADDR lets iotd bind again at once after a restart.
    socket.set_reuseaddr(true)?;
    socket.bind_device(Some(name.as_bytes()))?;
    socket.bind(address)?;
    socket.listen(64)
}

const EAFNOSUPPORT: i32 = 97;

async fn accept(listener: TcpListener, link: Link, name: String, accepted: mpsc::Sender<Accepted>) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                if accepted.send(Accepted { tcp, peer, link }).await.is_err() {
                    return;
                }
            }
            Err(error) if super::server::transient(&error) => {
                tracing::warn!(interface = %name, "onboarding page: accepting a connection: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(error) => {
                tracing::error!(interface = %name, "onboarding page: accepting connections: {error}; no longer served on this interface");
                return;
            }
        }
    }
}

/// A netlink socket subscribed to link changes: `changed` returns when the kernel reports one
/// (or several) since the last call.
struct LinkChanges {
    /// The netlink socket, driven as a datagram socket: tokio has no netlink type, and
    /// `recv(2)` is all it needs (registering a raw descriptor with tokio takes `unsafe`).
    socket: tokio::net::UnixDatagram,
}

/// RTMGRP_LINK: link (interface) added, removed or changed.
const RTMGRP_LINK: u32 = 1;

impl LinkChanges {
    fn open() -> io::Result<Self> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink};
        // `None`: NETLINK_ROUTE is protocol 0.
        let socket = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&socket, &netlink::SocketAddrNetlink::new(0, RTMGRP_LINK))?;
        let socket = std::os::unix::net::UnixDatagram::from(socket);
        Ok(Self {
            socket: tokio::net::UnixDatagram::from_std(socket)?,
        })
    }

    /// Waits for link messages and reads all there are; their content does not matter, as every
    /// configured interface is looked up again after each.
    async fn changed(&self) -> io::Result<()> {
        let mut buffer = [0u8; 4096];
        let first = self.socket.recv(&mut buffer).await;
        // The kernel dropped messages (ENOBUFS): something changed all the same.
        if let Err(error) = first
            && error.raw_os_error() != Some(ENOBUFS)
        {
            return Err(error);
        }
        loop {
            match self.socket.try_recv(&mut buffer) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.raw_os_error() == Some(ENOBUFS) => {}
                Err(error) => return Err(error),
            }
        }
    }
}

const ENOBUFS: i32 = 105;
