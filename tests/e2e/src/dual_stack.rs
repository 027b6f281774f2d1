//! Dual-stack pods through the reference plugins: ptp + host-local with an
//! IPv4 and an IPv6 range, then catena.

use anyhow::{anyhow, Result};
use catena_lab::{Conflist, Netns, Node, Pod};
use serde_json::json;
use std::net::Ipv6Addr;

/// The conflist `name`: ptp + host-local on `10.244.<subnet>.0/24` and
/// `fd00:10:244:<subnet>::/64` (default routes for both), then catena.
pub fn conflist(node: &Node, name: &str, subnet: u8) -> Result<Conflist> {
    Ok(Conflist::from_value(json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [{"subnet": format!("10.244.{subnet}.0/24")}],
                        [{"subnet": format!("fd00:10:244:{subnet}::/64")}]
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                    "dataDir": node.ipam_dir(),
                }
            },
            node.catena_plugin(),
        ]
    }))?)
}

/// No duplicate address detection in `ns`: addresses are usable at once
/// instead of staying tentative for a second or more. Must run before the
/// interfaces exist (`default` is copied into new interfaces).
pub fn no_dad(ns: &Netns) -> Result<()> {
    ns.run(
        "sysctl",
        &[
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ],
    )?;
    Ok(())
}

/// The pod's IPv6 address, from its ADD result.
pub fn pod_ipv6(pod: &Pod) -> Result<Ipv6Addr> {
    Ok(ipv6_config(pod)?.0)
}

/// The gateway of the pod's IPv6 address (ptp puts it on the host side of
/// the veth), from its ADD result.
pub fn pod_gateway6(pod: &Pod) -> Result<Ipv6Addr> {
    ipv6_config(pod)?
        .1
        .ok_or_else(|| anyhow!("{}'s IPv6 address has no gateway", pod.name))
}

fn ipv6_config(pod: &Pod) -> Result<(Ipv6Addr, Option<Ipv6Addr>)> {
    let result = pod
        .result()
        .ok_or_else(|| anyhow!("{} has no ADD result", pod.name))?;
    let ips = result.raw["ips"].as_array().cloned().unwrap_or_default();
    ips.iter()
        .find_map(|ip| {
            let addr = ip["address"].as_str()?.split('/').next()?.parse().ok()?;
            Some((addr, ip["gateway"].as_str().and_then(|g| g.parse().ok())))
        })
        .ok_or_else(|| anyhow!("{}'s ADD result has no IPv6 address", pod.name))
}
