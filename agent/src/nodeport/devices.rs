//! External devices: the interfaces NodePort, externalIP and LoadBalancer
//! traffic arrives on, where `from_netdev` / `to_netdev` are attached.
//!
//! `--devices` names them outright (each must exist, be up and have a
//! global IPv4 or IPv6 address). Without it they are detected,
//! Cilium-style: every interface that is up and has a global unicast IPv4
//! address (not 127/8, 169.254/16, 0/8, multicast) or IPv6 address (not
//! ::1, fe80::/10, multicast), except
//! - the loopback device;
//! - the host-side veths of endpoints registered with this agent (pods;
//!   ptp puts the gateway address on each of them);
//! - bridges and overlay devices (ethtool driver `bridge`, `openvswitch`,
//!   `vxlan`, `geneve`; kube-ovn's `ovn0`, flannel's `flannel.*`): pod
//!   networks (`cni0`, `docker0`, OVS) and tunnels between nodes, not the
//!   node's uplinks;
//! - veths that do not carry an IPv4 or IPv6 default route, as Cilium does: the
//!   primaries' pod veths (ptp puts the gateway address on each) are veths,
//!   so a pod veth not (yet) registered is never taken for an uplink.
//!
//! Detection runs at start and every second after (addresses and devices
//! that come and go are followed). With `--devices`, list every device SNAT
//! may leave through too: a flow sent to a remote backend must return on a
//! device catena is attached to.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// One external device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalDevice {
    pub name: String,
    pub ifindex: u32,
    /// Global unicast IPv4 addresses, the first being the SNAT address.
    pub addresses: Vec<Ipv4Addr>,
    /// Global unicast IPv6 addresses (unique-local included), the first
    /// being the IPv6 SNAT address. A device may have only one family.
    pub addresses6: Vec<Ipv6Addr>,
}

impl ExternalDevice {
    /// The IPv4 SNAT address; 0.0.0.0 for a device with IPv6 only (no IPv4
    /// flow is SNATed out of it).
    pub fn snat4(&self) -> Ipv4Addr {
        self.addresses
            .first()
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }
}

/// An interface as the detection sees it.
#[derive(Clone, Debug, Default)]
struct Interface {
    up: bool,
    loopback: bool,
    addresses: Vec<Ipv4Addr>,
    addresses6: Vec<Ipv6Addr>,
}

fn global_unicast(a: Ipv4Addr) -> bool {
    !(a.is_loopback()
        || a.is_link_local()
        || a.is_unspecified()
        || a.is_multicast()
        || a.is_broadcast()
        || a.octets()[0] == 0)
}

/// Whether `a` is a global unicast IPv6 address (not loopback, unspecified,
/// multicast, link-local or IPv4-mapped): the IPv6 addresses kept for an
/// external device, and those serving NodePorts (`node_addresses`).
pub(super) fn global_unicast6(a: Ipv6Addr) -> bool {
    !(a.is_loopback()
        || a.is_unspecified()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some())
}

fn interfaces() -> Result<BTreeMap<String, Interface>> {
    let mut out: BTreeMap<String, Interface> = BTreeMap::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        let entry = out.entry(ifa.interface_name.clone()).or_default();
        entry.up |= ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
        entry.loopback |= ifa
            .flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK);
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            let ip = sin.ip();
            if global_unicast(ip) && !entry.addresses.contains(&ip) {
                entry.addresses.push(ip);
            }
        }
        if let Some(sin6) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in6()) {
            let ip = sin6.ip();
            if global_unicast6(ip) && !entry.addresses6.contains(&ip) {
                entry.addresses6.push(ip);
            }
        }
    }
    Ok(out)
}

/// The device's driver as ethtool reports it ("veth", "bridge",
/// "openvswitch", "vxlan", a NIC driver...). Asked through a socket, so it
/// is answered by the caller's network namespace (sysfs would show the
/// namespace it was mounted in).
fn driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut DrvInfo,
        pad: [u8; 16],
    }
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain data, all-zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        pad: [0; 16],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL reads the name and writes `info` through the
    // pointer; both live across the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req) };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Overlay and pod-network devices of the primaries catena chains with.
fn pod_network_device(name: &str, driver: Option<&str>) -> bool {
    matches!(driver, Some("bridge" | "openvswitch" | "vxlan" | "geneve"))
        || name == "ovn0"
        || name.starts_with("flannel.")
}

/// Devices holding an IPv4 default route (`/proc/net/route`, main table)
/// or an IPv6 one (`/proc/net/ipv6_route`).
fn default_route_devices() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(table) = std::fs::read_to_string("/proc/net/route") {
        out.extend(table.lines().skip(1).filter_map(|line| {
            let mut cols = line.split_whitespace();
            let dev = cols.next()?;
            let dest = cols.next()?;
            let mask = cols.nth(5)?;
            (dest == "00000000" && mask == "00000000").then(|| dev.to_string())
        }));
    }
    if let Ok(table) = std::fs::read_to_string("/proc/net/ipv6_route") {
        out.extend(table.lines().filter_map(ipv6_default_route_device));
    }
    out
}

/// The device of a `/proc/net/ipv6_route` line if it is a default route
/// (destination ::/0). Columns: destination, prefix length, source, source
/// prefix length, next hop, metric, refcount, use, flags, device. The
/// kernel lists its unreachable `lo` default routes too: those are skipped
/// by the caller like any loopback device.
fn ipv6_default_route_device(line: &str) -> Option<String> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    if cols.len() < 10 {
        return None;
    }
    (cols[0] == "0".repeat(32) && cols[1] == "00").then(|| cols[9].to_string())
}

fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// The external devices: `configured` (the `--devices` flag) if not empty,
/// else detected. `endpoint_veths`: host veths of registered endpoints.
pub fn select(
    configured: &[String],
    endpoint_veths: &BTreeSet<String>,
) -> Result<Vec<ExternalDevice>> {
    let all = interfaces()?;
    let mut out = Vec::new();
    if !configured.is_empty() {
        for name in configured {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            let Some(iface) = all.get(name) else {
                bail!("--devices: no interface {name:?} with an address on this node");
            };
            let Some(idx) = ifindex(name) else {
                bail!("--devices: interface {name:?} vanished");
            };
            if iface.addresses.is_empty() && iface.addresses6.is_empty() {
                bail!(
                    "--devices: {name} has no global IPv4 or IPv6 address (needed for NodePorts \
                     and SNAT)"
                );
            }
            out.push(ExternalDevice {
                name: name.to_string(),
                ifindex: idx,
                addresses: iface.addresses.clone(),
                addresses6: iface.addresses6.clone(),
            });
        }
        return Ok(out);
    }
    let default_routes = default_route_devices();
    for (name, iface) in all {
        let drv = driver(&name);
        if !iface.up
            || iface.loopback
            || (iface.addresses.is_empty() && iface.addresses6.is_empty())
            || endpoint_veths.contains(&name)
            || pod_network_device(&name, drv.as_deref())
            || (drv.as_deref() == Some("veth") && !default_routes.contains(&name))
        {
            continue;
        }
        let Some(idx) = ifindex(&name) else { continue };
        out.push(ExternalDevice {
            name,
            ifindex: idx,
            addresses: iface.addresses,
            addresses6: iface.addresses6,
        });
    }
    Ok(out)
}

/// Every address of the devices (the NodePort frontends), sorted, unique.
pub fn node_addresses(devices: &[ExternalDevice]) -> Vec<Ipv4Addr> {
    let set: BTreeSet<Ipv4Addr> = devices
        .iter()
        .flat_map(|d| d.addresses.iter().copied())
        .collect();
    set.into_iter().collect()
}

/// Every IPv6 address of the devices (the IPv6 NodePort frontends),
/// sorted, unique.
pub fn node_addresses6(devices: &[ExternalDevice]) -> Vec<Ipv6Addr> {
    let set: BTreeSet<Ipv6Addr> = devices
        .iter()
        .flat_map(|d| d.addresses6.iter().copied())
        .collect();
    set.into_iter().collect()
}

/// Brings `DEVICES6` in line with `devices` (attached already): each
/// device's first global IPv6 address is where IPv6 flows to remote
/// backends are SNATed to; devices without one, and devices no longer
/// external, are removed. Writes only what differs (this runs every
/// second).
pub fn sync_ipv6(
    datapath: &mut catena_datapath::Datapath,
    devices: &[ExternalDevice],
) -> Result<()> {
    let programmed: BTreeMap<u32, Ipv6Addr> = datapath.devices6()?.into_iter().collect();
    for d in devices {
        let want = d.addresses6.first().copied();
        if programmed.get(&d.ifindex).copied() != want {
            datapath.set_device6(d.ifindex, want)?;
            if let Some(addr) = want {
                tracing::info!(device = %d.name, ifindex = d.ifindex, snat = %addr, "external device IPv6 SNAT address");
            }
        }
    }
    for ifindex in programmed.keys() {
        if !devices.iter().any(|d| d.ifindex == *ifindex) {
            datapath.set_device6(*ifindex, None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_unicast_excludes_special_ranges() {
        for a in [
            "127.0.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "0.1.2.3",
        ] {
            assert!(!global_unicast(a.parse().unwrap()), "{a}");
        }
        for a in ["10.0.0.1", "192.168.1.1", "203.0.113.9"] {
            assert!(global_unicast(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn global_unicast6_excludes_special_ranges() {
        for a in ["::1", "::", "fe80::1", "ff02::1", "::ffff:10.0.0.1"] {
            assert!(!global_unicast6(a.parse().unwrap()), "{a}");
        }
        for a in ["2001:db8::1", "fd00:77::1"] {
            assert!(global_unicast6(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn ipv6_default_routes_are_recognised() {
        let default = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                       fd007700000000000000000000000002 00000400 00000001 00000000 00000003 ext0";
        assert_eq!(ipv6_default_route_device(default).as_deref(), Some("ext0"));
        let subnet = "fd007700000000000000000000000000 40 00000000000000000000000000000000 00 \
                      00000000000000000000000000000000 00000100 00000001 00000000 00000001 ext0";
        assert_eq!(ipv6_default_route_device(subnet), None);
        assert_eq!(ipv6_default_route_device("garbage"), None);
    }

    #[test]
    fn configured_device_must_exist() {
        let err = select(&["catena-no-such-dev".into()], &BTreeSet::new()).unwrap_err();
        assert!(err.to_string().contains("catena-no-such-dev"), "{err}");
    }
}
