//! The parts of the primary plugin's result catena reads. One shape covers
//! 0.3.x/0.4.0 (`ips[].version` present) and 1.x (absent); `interface` is an
//! index into `interfaces` and may be missing.

use crate::error::{CniError, Code};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::net::IpAddr;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct PrevResult {
    #[serde(default, rename = "cniVersion")]
    pub cni_version: Option<String>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct IpConfig {
    pub address: String,
    #[serde(default)]
    pub interface: Option<usize>,
    #[serde(default)]
    pub version: Option<String>,
}

impl PrevResult {
    pub fn parse(raw: &RawValue) -> Result<Self, CniError> {
        let r: PrevResult = serde_json::from_str(raw.get()).map_err(|e| {
            CniError::new(Code::Decode, "cannot decode prevResult").with_details(e.to_string())
        })?;
        for ip in &r.ips {
            if !is_cidr(&ip.address) {
                return Err(CniError::new(
                    Code::Decode,
                    format!(
                        "prevResult: {:?} is not an address in CIDR notation",
                        ip.address
                    ),
                ));
            }
        }
        Ok(r)
    }

    /// Index of the sandbox interface `ifname`. A plugin may list host-side
    /// devices with the same name (another netns' eth0 is not ours), so an
    /// entry with `sandbox` set wins.
    pub fn sandbox_interface(&self, ifname: &str) -> Option<usize> {
        let named = |i: &&Interface| i.name == ifname;
        let in_sandbox =
            |(_, i): &(usize, &Interface)| i.sandbox.as_deref().is_some_and(|s| !s.is_empty());
        let mut candidates = self.interfaces.iter().enumerate().filter(|(_, i)| named(i));
        let first = candidates.clone().next().map(|(n, _)| n);
        candidates.find(in_sandbox).map(|(n, _)| n).or(first)
    }

    /// The addresses of `ifname`: those whose `interface` points at it. If no
    /// address names an interface at all (allowed by the spec, done by some
    /// primaries), they all belong to the one interface the plugin made.
    pub fn ips_for(&self, ifname: &str) -> Result<Vec<String>, CniError> {
        let ips: Vec<String> = if self.ips.iter().all(|ip| ip.interface.is_none()) {
            self.ips.iter().map(|ip| ip.address.clone()).collect()
        } else {
            let idx = self.sandbox_interface(ifname);
            self.ips
                .iter()
                .filter(|ip| ip.interface.is_some() && ip.interface == idx)
                .map(|ip| ip.address.clone())
                .collect()
        };
        if ips.is_empty() {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("prevResult has no IP address for interface {ifname:?}"),
            )
            .with_details("catena needs the pod's addresses from the primary plugin's result"));
        }
        Ok(ips)
    }
}

fn is_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    let (Ok(addr), Ok(len)) = (addr.parse::<IpAddr>(), len.parse::<u8>()) else {
        return false;
    };
    len <= if addr.is_ipv4() { 32 } else { 128 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> PrevResult {
        PrevResult::parse(&RawValue::from_string(s.to_string()).unwrap()).unwrap()
    }

    #[test]
    fn bridge_lists_the_bridge_first() {
        // bridge: [cni0, vethXXXX, eth0(sandbox)], ips point at index 2.
        let r = parse(
            r#"{"cniVersion":"0.4.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:00:00:01"},
                {"name":"veth3243","mac":"55:44:33:22:11:11"},
                {"name":"eth0","mac":"99:88:77:66:55:44","sandbox":"/var/run/netns/blue"}],
                "ips":[{"version":"4","address":"10.1.0.5/16","interface":2,"gateway":"10.1.0.1"},
                       {"version":"6","address":"fd00::5/64","interface":2}]}"#,
        );
        assert_eq!(r.sandbox_interface("eth0"), Some(2));
        assert_eq!(
            r.ips_for("eth0").unwrap(),
            vec!["10.1.0.5/16", "fd00::5/64"]
        );
    }

    #[test]
    fn bandwidth_adds_an_ifb_device() {
        // ptp then bandwidth: the ifb device is appended, the ip index is unchanged.
        let r = parse(
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth38fb12a8","mac":"c6:d6:4c:3c:a5:96"},
                {"name":"eth0","mac":"6e:41:bb:9d:48:e4","sandbox":"/var/run/netns/c5"},
                {"name":"bwp38fb12a8","mac":"1e:2a:00:00:00:01"}],
                "ips":[{"interface":1,"address":"10.99.0.5/24","gateway":"10.99.0.1"}]}"#,
        );
        assert_eq!(r.ips_for("eth0").unwrap(), vec!["10.99.0.5/24"]);
    }

    #[test]
    fn multus_second_interface_only_gets_its_own_ips() {
        let r = parse(
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/n"},
                {"name":"veth2"},{"name":"net1","sandbox":"/n"}],
                "ips":[{"interface":1,"address":"10.0.0.2/24"},{"interface":3,"address":"192.168.5.2/24"}]}"#,
        );
        assert_eq!(r.ips_for("net1").unwrap(), vec!["192.168.5.2/24"]);
        assert_eq!(r.ips_for("eth0").unwrap(), vec!["10.0.0.2/24"]);
        assert_eq!(r.ips_for("net2").unwrap_err().code, Code::InvalidConfig);
    }

    #[test]
    fn host_entry_with_the_same_name_is_not_the_sandbox_one() {
        let r = parse(
            r#"{"interfaces":[{"name":"eth0"},{"name":"eth0","sandbox":"/n"}],
                "ips":[{"interface":0,"address":"192.0.2.1/24"},{"interface":1,"address":"10.0.0.9/24"}]}"#,
        );
        assert_eq!(r.ips_for("eth0").unwrap(), vec!["10.0.0.9/24"]);
    }

    #[test]
    fn no_interface_index_means_all_ips() {
        let r =
            parse(r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.244.1.7/32"}]}"#);
        assert_eq!(r.ips_for("eth0").unwrap(), vec!["10.244.1.7/32"]);
        let empty = parse(r#"{"cniVersion":"1.0.0","interfaces":[],"ips":[]}"#);
        assert!(empty.ips_for("eth0").is_err());
    }

    #[test]
    fn rejects_malformed_results() {
        let bad = |s: &str| {
            PrevResult::parse(&RawValue::from_string(s.into()).unwrap())
                .unwrap_err()
                .code
        };
        assert_eq!(bad(r#"{"ips":[{"address":"10.0.0.1"}]}"#), Code::Decode);
        assert_eq!(bad(r#"{"ips":[{"address":"10.0.0.1/33"}]}"#), Code::Decode);
        assert_eq!(bad(r#"{"ips":"nope"}"#), Code::Decode);
        assert_eq!(bad(r#"[1,2]"#), Code::Decode);
    }
}
