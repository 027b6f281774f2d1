//! `GET /v1/bpf/{map}`: what the kernel maps hold, read from the pins and
//! decoded into columns (`catena bpf <map> list`). This is the ground truth
//! next to `catena service list`, which shows what the agent *meant* to
//! program. A new map needs one arm in [`dump`] and a decoder.

use super::bpf::{monotonic_ns, PinnedMap};
use anyhow::Result;
use catena_api::{BpfMapDump, BpfMapInfo};
use catena_common::ct::{Ct4Key, Ct4Value};
use catena_common::ct6::Ct6Key;
use catena_common::endpoint::EndpointInfo;
use catena_common::lb::{Backend4, RevNat4, Service4Key, Service4Value};
use catena_common::lb6::{addr6_octets, Addr6, Backend6, RevNat6, Service6Key, Service6Value};
use catena_common::map_names;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

/// Names `dump` understands (for error messages and the CLI).
pub const DUMPABLE: [&str; 5] = ["lb", "ct", "endpoint", "policy", "ipcache"];

/// None: no such dump.
pub fn dump(bpffs: &Path, name: &str) -> Option<Result<BpfMapDump>> {
    Some(match name {
        "lb" => lb(bpffs),
        "ct" => ct(bpffs),
        "endpoint" => endpoints(bpffs),
        "policy" => policy(bpffs),
        "ipcache" => ipcache(bpffs),
        _ => return None,
    })
}

fn addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

fn addr6(a: &Addr6) -> Ipv6Addr {
    Ipv6Addr::from(addr6_octets(a))
}

/// `[addr]:port` of an IPv6 address and a network-order port.
fn sock6(a: &Addr6, port_be: u16) -> String {
    SocketAddr::from((addr6(a), u16::from_be(port_be))).to_string()
}

/// Whether `<bpffs>/maps/<name>` is pinned (the IPv6 maps are absent when
/// programs from before IPv6 support are still pinned).
fn pinned(bpffs: &Path, name: &str) -> bool {
    bpffs.join("maps").join(name).exists()
}

fn info(map: &PinnedMap, entries: usize) -> BpfMapInfo {
    BpfMapInfo {
        name: map.name.clone(),
        entries: entries as u64,
        max_entries: map.max_entries.into(),
    }
}

fn columns(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn lb(bpffs: &Path) -> Result<BpfMapDump> {
    let services =
        PinnedMap::open_typed::<Service4Key, Service4Value>(bpffs, map_names::LB4_SERVICES)?;
    let backends_map = PinnedMap::open_typed::<u32, Backend4>(bpffs, map_names::LB4_BACKENDS)?;
    let revnat_map = PinnedMap::open_typed::<u32, RevNat4>(bpffs, map_names::LB4_REVNAT)?;
    let mut svc = services.typed::<Service4Key, Service4Value>()?;
    let backends: BTreeMap<u32, Backend4> = backends_map.typed()?.into_iter().collect();
    let revnat: BTreeMap<u32, RevNat4> = revnat_map.typed()?.into_iter().collect();
    svc.sort_by_key(|(k, _)| {
        (
            u32::from_be(k.address),
            u16::from_be(k.dport),
            k.proto,
            k.backend_slot,
        )
    });
    let mut rows: Vec<Vec<String>> = svc
        .iter()
        .map(|(k, v)| {
            let frontend = format!(
                "{}:{}/{}",
                addr(k.address),
                u16::from_be(k.dport),
                proto(k.proto)
            );
            let (backend, rev) = if k.backend_slot == 0 {
                // The master entry: backend count and reverse NAT.
                let rev = revnat
                    .get(&v.rev_nat_index)
                    .map(|r| {
                        format!(
                            "{} ({}:{})",
                            v.rev_nat_index,
                            addr(r.address),
                            u16::from_be(r.port)
                        )
                    })
                    .unwrap_or_else(|| v.rev_nat_index.to_string());
                (format!("({} backends)", v.count), rev)
            } else {
                let b = backends
                    .get(&v.backend_id)
                    .map(|b| format!("{}:{}", addr(b.address), u16::from_be(b.port)))
                    .unwrap_or_else(|| "<missing>".into());
                (format!("#{} {b}", v.backend_id), String::new())
            };
            vec![
                frontend,
                k.backend_slot.to_string(),
                backend,
                rev,
                format!("{:#x}", v.flags),
            ]
        })
        .collect();
    let mut maps = vec![
        info(&services, svc.len()),
        info(&backends_map, backends.len()),
        info(&revnat_map, revnat.len()),
    ];
    if pinned(bpffs, map_names::LB6_SERVICES) {
        let (maps6, rows6) = lb6(bpffs)?;
        maps.extend(maps6);
        rows.extend(rows6);
    }
    Ok(BpfMapDump {
        maps,
        columns: columns(&["FRONTEND", "SLOT", "BACKEND", "REVNAT", "FLAGS"]),
        rows,
    })
}

/// The `LB6_*` maps in the columns of [`lb`] (frontends as `[addr]:port/PROTO`).
fn lb6(bpffs: &Path) -> Result<(Vec<BpfMapInfo>, Vec<Vec<String>>)> {
    let services =
        PinnedMap::open_typed::<Service6Key, Service6Value>(bpffs, map_names::LB6_SERVICES)?;
    let backends_map = PinnedMap::open_typed::<u32, Backend6>(bpffs, map_names::LB6_BACKENDS)?;
    let revnat_map = PinnedMap::open_typed::<u32, RevNat6>(bpffs, map_names::LB6_REVNAT)?;
    let mut svc = services.typed::<Service6Key, Service6Value>()?;
    let backends: BTreeMap<u32, Backend6> = backends_map.typed()?.into_iter().collect();
    let revnat: BTreeMap<u32, RevNat6> = revnat_map.typed()?.into_iter().collect();
    svc.sort_by_key(|(k, _)| {
        (
            addr6(&k.address),
            u16::from_be(k.dport),
            k.proto,
            k.backend_slot,
        )
    });
    let rows = svc
        .iter()
        .map(|(k, v)| {
            let frontend = format!("{}/{}", sock6(&k.address, k.dport), proto(k.proto));
            let (backend, rev) = if k.backend_slot == 0 {
                let rev = revnat
                    .get(&v.rev_nat_index)
                    .map(|r| format!("{} ({})", v.rev_nat_index, sock6(&r.address, r.port)))
                    .unwrap_or_else(|| v.rev_nat_index.to_string());
                (format!("({} backends)", v.count), rev)
            } else {
                let b = backends
                    .get(&v.backend_id)
                    .map(|b| sock6(&b.address, b.port))
                    .unwrap_or_else(|| "<missing>".into());
                (format!("#{} {b}", v.backend_id), String::new())
            };
            vec![
                frontend,
                k.backend_slot.to_string(),
                backend,
                rev,
                format!("{:#x}", v.flags),
            ]
        })
        .collect();
    Ok((
        vec![
            info(&services, svc.len()),
            info(&backends_map, backends.len()),
            info(&revnat_map, revnat.len()),
        ],
        rows,
    ))
}

/// One conntrack row; `src`/`dst` already formatted for the family.
fn ct_row(kind: u8, proto_nr: u8, src: String, dst: String, v: &Ct4Value, now: u64) -> Vec<String> {
    vec![
        super::conntrack::kind_name(kind),
        proto(proto_nr),
        src,
        dst,
        v.backend_id.to_string(),
        v.rev_nat_index.to_string(),
        format!("{:#x}", v.flags),
        v.packets.to_string(),
        v.bytes.to_string(),
        format!("{}s", now.saturating_sub(v.last_seen_ns) / 1_000_000_000),
    ]
}

/// `CT4`, then `CT6` (backend ids and rev-NAT indices of IPv6 rows refer to
/// `LB6_BACKENDS` and `LB6_REVNAT`).
fn ct(bpffs: &Path) -> Result<BpfMapDump> {
    let map = PinnedMap::open_typed::<Ct4Key, Ct4Value>(bpffs, map_names::CT4)?;
    let mut entries = map.typed::<Ct4Key, Ct4Value>()?;
    entries.sort_by_key(|(_, v)| v.created_ns);
    let now = monotonic_ns();
    let mut rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(k, v)| {
            ct_row(
                k.kind,
                k.proto,
                format!("{}:{}", addr(k.saddr), u16::from_be(k.sport)),
                format!("{}:{}", addr(k.daddr), u16::from_be(k.dport)),
                v,
                now,
            )
        })
        .collect();
    let mut maps = vec![info(&map, entries.len())];
    if pinned(bpffs, map_names::CT6) {
        let map6 = PinnedMap::open_typed::<Ct6Key, Ct4Value>(bpffs, map_names::CT6)?;
        let mut entries6 = map6.typed::<Ct6Key, Ct4Value>()?;
        entries6.sort_by_key(|(_, v)| v.created_ns);
        rows.extend(entries6.iter().map(|(k, v)| {
            ct_row(
                k.kind,
                k.proto,
                sock6(&k.saddr, k.sport),
                sock6(&k.daddr, k.dport),
                v,
                now,
            )
        }));
        maps.push(info(&map6, entries6.len()));
    }
    Ok(BpfMapDump {
        maps,
        columns: columns(&[
            "KIND",
            "PROTO",
            "SRC",
            "DST",
            "BACKEND-ID",
            "REVNAT",
            "FLAGS",
            "PACKETS",
            "BYTES",
            "IDLE",
        ]),
        rows,
    })
}

fn endpoints(bpffs: &Path) -> Result<BpfMapDump> {
    let map = PinnedMap::open_typed::<u32, EndpointInfo>(bpffs, map_names::ENDPOINTS)?;
    let mut entries = map.typed::<u32, EndpointInfo>()?;
    entries.sort_by_key(|(k, _)| *k);
    let rows = entries
        .iter()
        .map(|(ifindex, e)| {
            vec![
                ifindex.to_string(),
                crate::ops::ifname(*ifindex).unwrap_or_else(|| "<gone>".into()),
                addr(e.ipv4).to_string(),
                addr6(&e.ipv6).to_string(),
                e.endpoint_id.to_string(),
                e.identity.to_string(),
                format!("{:#x}", e.flags),
            ]
        })
        .collect();
    Ok(BpfMapDump {
        maps: vec![info(&map, entries.len())],
        columns: columns(&[
            "IFINDEX",
            "INTERFACE",
            "IPV4",
            "IPV6",
            "ENDPOINT",
            "IDENTITY",
            "FLAGS",
        ]),
        rows,
    })
}

pub fn proto(p: u8) -> String {
    match p {
        catena_common::IPPROTO_TCP => "TCP".into(),
        catena_common::IPPROTO_UDP => "UDP".into(),
        catena_common::IPPROTO_SCTP => "SCTP".into(),
        1 => "ICMP".into(),
        catena_common::IPPROTO_ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// Entries and capacity of the maps whose filling matters to operators.
pub fn pressure(bpffs: &Path) -> Vec<catena_api::MapPressure> {
    [
        map_names::CT4,
        map_names::CT6,
        map_names::LB4_SERVICES,
        map_names::LB4_BACKENDS,
        map_names::LB6_SERVICES,
        map_names::LB6_BACKENDS,
        map_names::ENDPOINTS,
    ]
    .iter()
    .filter_map(|name| {
        let map = PinnedMap::open(&bpffs.join("maps").join(name)).ok()?;
        let entries = map.keys().ok()?.len() as u64;
        let max = u64::from(map.max_entries);
        Some(catena_api::MapPressure {
            name: name.to_string(),
            entries,
            max_entries: max,
            pressure: if max == 0 {
                0.0
            } else {
                entries as f64 / max as f64
            },
        })
    })
    .collect()
}

/// An LPM trie key as the kernel lays it out: prefix length, then the data.
#[repr(C)]
#[derive(Clone, Copy)]
struct LpmKey<T: Copy> {
    prefix_len: u32,
    data: T,
}

fn ipcache(bpffs: &Path) -> Result<BpfMapDump> {
    use catena_common::policy::IpcacheValue;
    let map = PinnedMap::open_typed::<LpmKey<u32>, IpcacheValue>(bpffs, map_names::IPCACHE)?;
    let mut entries = map.typed::<LpmKey<u32>, IpcacheValue>()?;
    entries.sort_by_key(|(k, _)| (u32::from_be(k.data), k.prefix_len));
    let mut rows: Vec<Vec<String>> = entries
        .iter()
        .map(|(k, v)| {
            vec![
                format!("{}/{}", addr(k.data), k.prefix_len),
                v.identity.to_string(),
            ]
        })
        .collect();
    // The IPv6 prefixes (words in network order, as the programs hold them).
    let map6 = PinnedMap::open_typed::<LpmKey<[u32; 4]>, IpcacheValue>(bpffs, map_names::IPCACHE6)?;
    let mut entries6 = map6.typed::<LpmKey<[u32; 4]>, IpcacheValue>()?;
    let addr6 = |w: [u32; 4]| {
        let b: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b.as_slice()).unwrap_or_default())
    };
    entries6.sort_by_key(|(k, _)| (addr6(k.data), k.prefix_len));
    rows.extend(entries6.iter().map(|(k, v)| {
        vec![
            format!("{}/{}", addr6(k.data), k.prefix_len),
            v.identity.to_string(),
        ]
    }));
    Ok(BpfMapDump {
        maps: vec![info(&map, entries.len()), info(&map6, entries6.len())],
        columns: columns(&["PREFIX", "IDENTITY"]),
        rows,
    })
}

fn policy(bpffs: &Path) -> Result<BpfMapDump> {
    use catena_common::policy::{
        PolicyKey, PolicyValue, DIR_INGRESS, KIND_DENY, POLICY_PREFIX_ANY_PROTO,
        POLICY_PREFIX_PROTO,
    };
    let map = PinnedMap::open_typed::<LpmKey<PolicyKey>, PolicyValue>(bpffs, map_names::POLICY)?;
    let mut entries = map.typed::<LpmKey<PolicyKey>, PolicyValue>()?;
    entries.sort_by_key(|(k, _)| (k.data, k.prefix_len));
    let rows = entries
        .iter()
        .map(|(k, v)| {
            let d = k.data;
            let (proto, port) = match k.prefix_len {
                p if p <= POLICY_PREFIX_ANY_PROTO => ("ANY".to_string(), "ANY".to_string()),
                p if p <= POLICY_PREFIX_PROTO => (proto(d.proto), "ANY".to_string()),
                p => {
                    let bits = p - POLICY_PREFIX_PROTO;
                    let port = u16::from_be(d.port);
                    let port = if bits == 16 {
                        port.to_string()
                    } else {
                        format!("{port}/{bits}")
                    };
                    (proto(d.proto), port)
                }
            };
            vec![
                d.endpoint_id.to_string(),
                if d.direction == DIR_INGRESS {
                    "ingress"
                } else {
                    "egress"
                }
                .to_string(),
                if d.kind == KIND_DENY { "deny" } else { "allow" }.to_string(),
                if d.identity == 0 {
                    "ANY".to_string()
                } else {
                    d.identity.to_string()
                },
                proto,
                port,
                v.rule_ref.to_string(),
            ]
        })
        .collect();
    Ok(BpfMapDump {
        maps: vec![info(&map, entries.len())],
        columns: columns(&[
            "ENDPOINT",
            "DIRECTION",
            "VERDICT",
            "IDENTITY",
            "PROTO",
            "PORT",
            "RULE",
        ]),
        rows,
    })
}
