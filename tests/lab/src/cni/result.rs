//! The parts of a CNI result the lab and its tests look at.

use serde_json::Value;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultInterface {
    pub name: String,
    pub mac: String,
    /// Set for interfaces inside the pod.
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

/// The final result of an ADD through the whole chain.
#[derive(Clone, Debug, PartialEq)]
pub struct AddResult {
    /// Exactly what the last plugin printed.
    pub raw: Value,
    pub interfaces: Vec<ResultInterface>,
    pub ips: Vec<IpConfig>,
    /// Wall time of the whole ADD chain (VERSION probes excluded).
    pub elapsed: Duration,
}

impl AddResult {
    /// Parses the fields of any result version (0.3.0 and later; 0.1/0.2's
    /// `ip4` object is mapped too). Unparseable entries are skipped, `raw` keeps all.
    pub fn from_value(raw: Value, elapsed: Duration) -> AddResult {
        let interfaces = raw["interfaces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| ResultInterface {
                        name: i["name"].as_str().unwrap_or_default().to_string(),
                        mac: i["mac"].as_str().unwrap_or_default().to_string(),
                        sandbox: i["sandbox"]
                            .as_str()
                            .filter(|s| !s.is_empty())
                            .map(str::to_string),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut ips: Vec<IpConfig> = raw["ips"]
            .as_array()
            .map(|a| a.iter().filter_map(parse_ip).collect())
            .unwrap_or_default();
        for legacy in ["ip4", "ip6"] {
            if raw[legacy].is_object() {
                ips.extend(parse_ip(&raw[legacy]));
            }
        }
        AddResult {
            raw,
            interfaces,
            ips,
            elapsed,
        }
    }

    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|c| match c.address {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
    }

    /// The sandbox interface named `ifname` and its index in `interfaces`.
    pub fn sandbox_interface(&self, ifname: &str) -> Option<(usize, &ResultInterface)> {
        self.interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.name == ifname && i.sandbox.is_some())
    }

    /// Interfaces outside the pod (host veth, bridge, ifb...).
    pub fn host_interfaces(&self) -> impl Iterator<Item = &ResultInterface> {
        self.interfaces.iter().filter(|i| i.sandbox.is_none())
    }
}

fn parse_ip(v: &Value) -> Option<IpConfig> {
    let (addr, prefix) = v["address"].as_str()?.split_once('/')?;
    Some(IpConfig {
        address: addr.parse().ok()?,
        prefix_len: prefix.parse().ok()?,
        gateway: v["gateway"].as_str().and_then(|g| g.parse().ok()),
        interface: v["interface"].as_u64().map(|i| i as usize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_ptp_result() {
        let r = AddResult::from_value(
            json!({"cniVersion":"1.0.0",
                "interfaces":[{"name":"veth38fb12a8","mac":"c6:d6:4c:3c:a5:96"},
                              {"name":"eth0","mac":"6e:41:bb:9d:48:e4","sandbox":"/var/run/netns/c5"}],
                "ips":[{"interface":1,"address":"10.99.0.5/24","gateway":"10.99.0.1"}]}),
            Duration::ZERO,
        );
        assert_eq!(r.ipv4(), Some(Ipv4Addr::new(10, 99, 0, 5)));
        assert_eq!(r.ips[0].prefix_len, 24);
        assert_eq!(r.sandbox_interface("eth0").map(|(i, _)| i), Some(1));
        assert_eq!(r.host_interfaces().count(), 1);
    }
}
