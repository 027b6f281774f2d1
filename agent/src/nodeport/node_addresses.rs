//! The node's own addresses and network namespace, for NodePorts reached
//! from the node itself and from its pods through the socket-level load
//! balancer (`ebpf/programs/src/node_addr.rs` has the design: one wildcard
//! frontend per NodePort plus this small set).
//!
//! Which addresses: every unicast address of every interface in the node's
//! namespace, as kube-proxy's default `--nodeport-addresses` (its
//! `--dst-type LOCAL` match) — not only the external devices': a second
//! NIC, a dummy interface or the pod gateway address ptp puts on host veths
//! serve NodePorts too. Loopback addresses are not listed: the programs
//! recognise 127.0.0.0/8 and ::1 themselves and serve them only to callers
//! in the node's namespace (`NODE_NETNS`), since a pod's loopback is the
//! pod's own. IPv6 link-local addresses are left out: they are only unique
//! per link, and the socket call's address carries no scope.
//!
//! Synced with the devices, every second (`AgentCore::sync_devices`),
//! writing only what changed.

use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};

use super::devices::global_unicast6;

/// Whether IPv4 `a`, an address of a node interface, serves NodePorts.
fn serves_node_ports4(a: Ipv4Addr) -> bool {
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || a.is_broadcast()
        || a.octets()[0] == 0)
}

/// Splits interface addresses into the IPv4 and IPv6 NodePort addresses.
fn node_port_addresses(
    addrs: impl IntoIterator<Item = std::net::IpAddr>,
) -> (BTreeSet<Ipv4Addr>, BTreeSet<Ipv6Addr>) {
    let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
    for a in addrs {
        match a {
            std::net::IpAddr::V4(a) if serves_node_ports4(a) => {
                v4.insert(a);
            }
            std::net::IpAddr::V6(a) if global_unicast6(a) => {
                v6.insert(a);
            }
            _ => {}
        }
    }
    (v4, v6)
}

/// Every IPv4 and IPv6 address of every interface in the calling thread's
/// network namespace (an address on several interfaces comes once per
/// interface).
pub fn interface_addresses() -> Result<impl Iterator<Item = std::net::IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()
        .context("listing interface addresses")?
        .filter_map(|ifa| {
            let a = ifa.address?;
            a.as_sockaddr_in()
                .map(|s| std::net::IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
        }))
}

/// The node's NodePort addresses, from its interfaces.
pub fn current() -> Result<(BTreeSet<Ipv4Addr>, BTreeSet<Ipv6Addr>)> {
    Ok(node_port_addresses(interface_addresses()?))
}

/// The cookie of the calling thread's network namespace (the kernel's
/// `SO_NETNS_COOKIE`, Linux 5.14+), as `bpf_get_netns_cookie()` reports it
/// to the socket programs.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    // Not in every libc crate version; the value is the kernel's ABI.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .or_else(|_| std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` outlive the call and match the option's
    // size; the fd is the socket's own.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Said once per agent: loopback NodePorts off on this kernel.
static NETNS_WARNED: AtomicBool = AtomicBool::new(false);

/// Brings the datapath's node addresses and node namespace in line with
/// the node (the agent runs in the node's network namespace).
pub fn sync(datapath: &mut catena_datapath::Datapath) -> Result<()> {
    match own_netns_cookie() {
        Ok(cookie) => {
            if datapath.node_netns()? != cookie {
                datapath.set_node_netns(cookie)?;
                tracing::info!(
                    netns_cookie = cookie,
                    "loopback NodePorts served to node processes"
                );
            }
        }
        Err(e) => {
            if !NETNS_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "no SO_NETNS_COOKIE on this kernel: NodePorts on 127.0.0.1 / ::1 are not served");
            }
        }
    }
    let (v4, v6) = current()?;
    let changes = datapath.sync_node_addresses(&v4, &v6)?;
    if !changes.is_empty() {
        tracing::info!(added = ?changes.added, removed = ?changes.removed, "node addresses serving NodePorts changed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unicast_address_serves_node_ports_but_loopback_and_link_local_v6() {
        let addrs = [
            "192.168.1.1",
            "10.244.1.1",
            "169.254.3.3",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "fd00:77::1",
            "2001:db8::1",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "192.168.1.1",
        ]
        .map(|a| a.parse().unwrap());
        let (v4, v6) = node_port_addresses(addrs);
        let want4: BTreeSet<Ipv4Addr> = ["10.244.1.1", "169.254.3.3", "192.168.1.1"]
            .map(|a| a.parse().unwrap())
            .into();
        let want6: BTreeSet<Ipv6Addr> = ["2001:db8::1", "fd00:77::1"]
            .map(|a| a.parse().unwrap())
            .into();
        assert_eq!((v4, v6), (want4, want6));
    }

    #[test]
    fn netns_cookie_is_stable_and_nonzero() {
        let a = own_netns_cookie().expect("SO_NETNS_COOKIE (Linux 5.14+)");
        assert_ne!(a, 0);
        assert_eq!(own_netns_cookie().unwrap(), a);
        // Another thread of the same namespace sees the same cookie.
        let b = std::thread::spawn(|| own_netns_cookie().unwrap())
            .join()
            .unwrap();
        assert_eq!(a, b);
    }
}
