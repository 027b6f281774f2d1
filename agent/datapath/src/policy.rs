//! The datapath's policy input and its readers. CONTRACT between the agent's
//! policy compiler and the datapath (see the docs on each item).
//!
//! How it is programmed (map layout: `catena_common::policy`):
//! - every rule becomes one `POLICY` entry per port prefix (a range is split
//!   into the minimal set of aligned prefixes; "any port" and "any protocol"
//!   are shorter prefixes); rules that produce the same entry are merged, the
//!   smallest `rule_ref` naming it;
//! - `POLICY_EP[endpoint_id]` carries the enforcement flags (and whether deny
//!   entries exist, so the programs skip the deny lookups otherwise);
//! - the ipcache prefixes are normalised (host bits cleared); IPv4 ones go
//!   to `IPCACHE`, IPv6 ones to `IPCACHE6` (the rules are shared: they name
//!   identities, never addresses).
//!
//! `apply_policy` diffs against a mirror rebuilt from the pinned maps at open,
//! so a restarted agent writes only what changed. Endpoint ids are reused by
//! the agent: `Datapath::remove_endpoint` clears the removed endpoint's flags
//! and entries at once, so a new endpoint that gets the id never inherits them.

use crate::endpoints::not_found;
use crate::{sys, Datapath};
use anyhow::{bail, Context};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData};
use catena_common::policy::{
    Ipcache6Key, IpcacheValue, PolicyKey, PolicyValue, DIR_EGRESS, DIR_INGRESS, KIND_ALLOW,
    KIND_DENY, POLICY_EP_EGRESS, POLICY_EP_EGRESS_DENY, POLICY_EP_INGRESS, POLICY_EP_INGRESS_DENY,
    POLICY_EP_MAX, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL, POLICY_PREFIX_PROTO,
};
use catena_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::Path;
use tracing::debug;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic into the endpoint (checked in `to_container`).
    Ingress,
    /// Traffic out of the endpoint (checked in `from_container`, after
    /// service translation, so it sees the backend's identity and port).
    Egress,
}

/// An inclusive port range; `{0, 0}` means any port. For ICMP (proto 1) and
/// ICMPv6 (proto 58) the "port" is the type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub const ANY: PortRange = PortRange { start: 0, end: 0 };

    pub fn single(port: u16) -> PortRange {
        PortRange {
            start: port,
            end: port,
        }
    }

    pub fn is_any(self) -> bool {
        self == PortRange::ANY
    }
}

/// One allow or deny entry of an endpoint's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct PolicyRule {
    pub direction: Direction,
    /// Remote identity; `identity::ANY` (0) matches every identity.
    pub remote_identity: u32,
    /// IP protocol; 0 matches any protocol (and then `ports` must be ANY).
    pub proto: u8,
    pub ports: PortRange,
    /// Deny wins over any allow that also matches.
    pub deny: bool,
    /// Agent-side reference to the policy that produced this entry, carried
    /// in verdict and drop events (0: none).
    pub rule_ref: u32,
}

/// An endpoint's whole policy. A direction that is not enforced allows all
/// (no policy selects the endpoint in that direction); an enforced one allows
/// only what an allow rule matches and no deny rule matches. Replies of
/// allowed connections always pass (conntrack).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub rules: Vec<PolicyRule>,
}

/// Everything the policy maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyDesired {
    /// Prefix (address, length) -> identity, IPv4 and IPv6. Longest prefix
    /// of the address's family wins; an address matching nothing is
    /// `identity::WORLD`.
    pub ipcache: BTreeMap<(IpAddr, u8), u32>,
    /// Endpoint id -> its policy. An endpoint id absent here allows all.
    pub endpoints: BTreeMap<u32, EndpointPolicy>,
}

/// What `apply_policy` changed. "Entries" are `POLICY` entries and
/// per-endpoint flag words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub entries_written: usize,
    pub entries_removed: usize,
    pub ipcache_written: usize,
    pub ipcache_removed: usize,
}

impl Datapath {
    /// Makes the policy maps hold exactly `desired`, writing only what
    /// differs, in an order that never opens a hole: new allows and denies
    /// first, enforcement flags after, removals last.
    pub fn apply_policy(&mut self, desired: &PolicyDesired) -> anyhow::Result<PolicyStats> {
        self.policy.apply(desired)
    }

    /// The policy entries programmed for an endpoint, read back from the maps.
    /// Rules come back sorted, as the maps hold them: rules that produced the
    /// same entries (overlapping ranges of one identity and protocol) come back
    /// merged. `None` if the endpoint has neither flags nor entries.
    pub fn endpoint_policy(&self, endpoint_id: u32) -> anyhow::Result<Option<EndpointPolicy>> {
        self.policy.read_endpoint(endpoint_id)
    }

    /// The ipcache as programmed.
    pub fn ipcache(&self) -> anyhow::Result<BTreeMap<(IpAddr, u8), u32>> {
        self.policy.read_ipcache()
    }
}

/// One `POLICY` entry: key data and prefix length.
type EntryKey = (PolicyKey, u32);

pub(crate) struct PolicyMaps {
    pub ipcache: LpmTrie<MapData, u32, IpcacheValue>,
    pub ipcache6: LpmTrie<MapData, Ipcache6Key, IpcacheValue>,
    pub policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    pub endpoints: Array<MapData, u32>,
}

/// The maps plus a mirror of what they hold (rebuilt from them at open).
pub(crate) struct Policy {
    maps: PolicyMaps,
    entries: BTreeMap<EntryKey, PolicyValue>,
    /// Endpoint id -> non-zero flags.
    flags: BTreeMap<u32, u32>,
    ipcache: BTreeMap<(IpAddr, u8), u32>,
}

fn dir_code(d: Direction) -> u8 {
    match d {
        Direction::Ingress => DIR_INGRESS,
        Direction::Egress => DIR_EGRESS,
    }
}

/// The minimal set of aligned prefixes covering `start..=end`, as (first
/// port, prefix bits of the 16).
pub(crate) fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u32)> {
    let (mut lo, hi) = (start as u32, end as u32);
    let mut out = Vec::new();
    while lo <= hi {
        // The largest block aligned at `lo` that does not pass `hi`.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ICMP | IPPROTO_ICMPV6
    )
}

/// The entries of one rule.
fn rule_entries(endpoint_id: u32, rule: &PolicyRule) -> anyhow::Result<Vec<EntryKey>> {
    let base = PolicyKey {
        endpoint_id,
        identity: rule.remote_identity,
        direction: dir_code(rule.direction),
        kind: if rule.deny { KIND_DENY } else { KIND_ALLOW },
        ..PolicyKey::default()
    };
    if rule.proto == 0 {
        if !rule.ports.is_any() {
            bail!("endpoint {endpoint_id}: rule {rule:?} has ports but no protocol");
        }
        return Ok(vec![(base, POLICY_PREFIX_ANY_PROTO)]);
    }
    let with_proto = PolicyKey {
        proto: rule.proto,
        ..base
    };
    if rule.ports.is_any() {
        return Ok(vec![(with_proto, POLICY_PREFIX_PROTO)]);
    }
    if !has_ports(rule.proto) {
        bail!(
            "endpoint {endpoint_id}: rule {rule:?}: protocol {} has no ports",
            rule.proto
        );
    }
    if rule.ports.start > rule.ports.end {
        bail!("endpoint {endpoint_id}: rule {rule:?}: port range start > end");
    }
    if matches!(rule.proto, IPPROTO_ICMP | IPPROTO_ICMPV6) && rule.ports.end > u8::MAX as u16 {
        bail!("endpoint {endpoint_id}: rule {rule:?}: ICMP types are 0..=255");
    }
    Ok(port_prefixes(rule.ports.start, rule.ports.end)
        .into_iter()
        .map(|(port, bits)| {
            (
                PolicyKey {
                    port: port.to_be(),
                    ..with_proto
                },
                POLICY_PREFIX_PROTO + bits,
            )
        })
        .collect())
}

fn flags_of(
    endpoint_id: u32,
    p: &EndpointPolicy,
    entries: &BTreeMap<EntryKey, PolicyValue>,
) -> u32 {
    let mut flags = 0;
    if p.ingress_enforced {
        flags |= POLICY_EP_INGRESS;
    }
    if p.egress_enforced {
        flags |= POLICY_EP_EGRESS;
    }
    // Deny lookups only matter in an enforced direction; an endpoint with
    // rules but no enforcement keeps flags 0 (the fast path).
    let mut deny = deny_flags(endpoint_id, entries.keys());
    if !p.ingress_enforced {
        deny &= !POLICY_EP_INGRESS_DENY;
    }
    if !p.egress_enforced {
        deny &= !POLICY_EP_EGRESS_DENY;
    }
    flags | deny
}

fn deny_flags<'a>(endpoint_id: u32, keys: impl Iterator<Item = &'a EntryKey>) -> u32 {
    let mut flags = 0;
    for (k, _) in keys {
        if k.endpoint_id == endpoint_id && k.kind == KIND_DENY {
            flags |= if k.direction == DIR_EGRESS {
                POLICY_EP_EGRESS_DENY
            } else {
                POLICY_EP_INGRESS_DENY
            };
        }
    }
    flags
}

/// The desired map contents.
type Compiled = (
    BTreeMap<EntryKey, PolicyValue>,
    BTreeMap<u32, u32>,
    BTreeMap<(IpAddr, u8), u32>,
);

fn compile(desired: &PolicyDesired) -> anyhow::Result<Compiled> {
    let mut entries = BTreeMap::new();
    let mut flags = BTreeMap::new();
    for (&id, p) in &desired.endpoints {
        if id >= POLICY_EP_MAX {
            bail!(
                "endpoint id {id} is too large for policy (max {})",
                POLICY_EP_MAX - 1
            );
        }
        let mut mine = BTreeMap::new();
        for rule in &p.rules {
            for key in rule_entries(id, rule)? {
                let v = mine.entry(key).or_insert(PolicyValue {
                    rule_ref: rule.rule_ref,
                    flags: 0,
                });
                v.rule_ref = v.rule_ref.min(rule.rule_ref);
            }
        }
        let f = flags_of(id, p, &mine);
        if f != 0 {
            flags.insert(id, f);
        }
        entries.extend(mine);
    }
    let mut ipcache = BTreeMap::new();
    for (&(addr, len), &identity) in &desired.ipcache {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            bail!("ipcache prefix {addr}/{len}: length above {max}");
        }
        let key = (mask(addr, len), len);
        if let Some(old) = ipcache.insert(key, identity) {
            if old != identity {
                bail!(
                    "ipcache prefix {}/{len} given identities {old} and {identity}",
                    key.0
                );
            }
        }
    }
    Ok((entries, flags, ipcache))
}

/// `addr` with the bits beyond `len` cleared (`len` within the family).
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

fn ipcache_key(addr: Ipv4Addr, len: u8) -> Key<u32> {
    Key::new(len as u32, u32::from_ne_bytes(addr.octets()))
}

/// The address as the programs hold it: four words in network order.
fn ipcache6_key(addr: Ipv6Addr, len: u8) -> Key<Ipcache6Key> {
    let o = addr.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    Key::new(len as u32, [word(0), word(4), word(8), word(12)])
}

fn ipcache6_addr(words: Ipcache6Key) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// Both ipcache maps' contents.
fn read_ipcaches(maps: &PolicyMaps) -> anyhow::Result<BTreeMap<(IpAddr, u8), u32>> {
    let mut out = BTreeMap::new();
    for item in maps.ipcache.iter() {
        let (k, v) = item.context("reading IPCACHE")?;
        let addr = Ipv4Addr::from(k.data().to_ne_bytes());
        out.insert((IpAddr::V4(addr), k.prefix_len() as u8), v.identity);
    }
    for item in maps.ipcache6.iter() {
        let (k, v) = item.context("reading IPCACHE6")?;
        let addr = ipcache6_addr(k.data());
        out.insert((IpAddr::V6(addr), k.prefix_len() as u8), v.identity);
    }
    Ok(out)
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(e) if not_found(&e) => Ok(()),
        other => other,
    }
}

impl Policy {
    /// Rebuilds the mirror from the pinned maps.
    /// `endpoints_pin` is `POLICY_EP`'s pin, read in batches (its 64k slots
    /// one by one would take a third of a second).
    pub fn open(maps: PolicyMaps, endpoints_pin: &Path) -> anyhow::Result<Policy> {
        let mut entries = BTreeMap::new();
        for item in maps.policy.iter() {
            let (k, v) = item.context("reading POLICY")?;
            entries.insert((k.data(), k.prefix_len()), v);
        }
        let fd = sys::obj_get(endpoints_pin)
            .with_context(|| format!("opening {}", endpoints_pin.display()))?;
        let flags: BTreeMap<u32, u32> = sys::array_u32_batch(fd.as_fd(), POLICY_EP_MAX)
            .context("reading POLICY_EP")?
            .into_iter()
            .filter(|(_, f)| *f != 0)
            .collect();
        let ipcache = read_ipcaches(&maps)?;
        debug!(
            entries = entries.len(),
            endpoints = flags.len(),
            ipcache = ipcache.len(),
            "rebuilt policy state from pinned maps"
        );
        Ok(Policy {
            maps,
            entries,
            flags,
            ipcache,
        })
    }

    fn put_entry(&mut self, key: EntryKey, value: PolicyValue) -> anyhow::Result<()> {
        self.maps
            .policy
            .insert(&Key::new(key.1, key.0), value, 0)
            .with_context(|| format!("writing POLICY {key:?}"))?;
        self.entries.insert(key, value);
        Ok(())
    }

    fn del_entry(&mut self, key: EntryKey) -> anyhow::Result<()> {
        ignore_missing(self.maps.policy.remove(&Key::new(key.1, key.0)))
            .with_context(|| format!("deleting POLICY {key:?}"))?;
        self.entries.remove(&key);
        Ok(())
    }

    fn set_flags(&mut self, id: u32, flags: u32) -> anyhow::Result<()> {
        self.maps
            .endpoints
            .set(id, flags, 0)
            .with_context(|| format!("writing POLICY_EP[{id}]"))?;
        if flags == 0 {
            self.flags.remove(&id);
        } else {
            self.flags.insert(id, flags);
        }
        Ok(())
    }

    pub fn apply(&mut self, desired: &PolicyDesired) -> anyhow::Result<PolicyStats> {
        let (entries, flags, ipcache) = compile(desired)?;
        let mut stats = PolicyStats::default();

        // 1. New identities first, so new entries see the remotes they name.
        for (&(addr, len), &identity) in &ipcache {
            if self.ipcache.get(&(addr, len)) != Some(&identity) {
                let v = IpcacheValue { identity, flags: 0 };
                match addr {
                    IpAddr::V4(a) => self.maps.ipcache.insert(&ipcache_key(a, len), v, 0),
                    IpAddr::V6(a) => self.maps.ipcache6.insert(&ipcache6_key(a, len), v, 0),
                }
                .with_context(|| format!("writing the ipcache entry {addr}/{len}"))?;
                self.ipcache.insert((addr, len), identity);
                stats.ipcache_written += 1;
            }
        }
        // 2. New and changed allows and denies: not consulted for a direction
        //    (deny lookups) until its flags say so.
        for (&key, &value) in &entries {
            if self.entries.get(&key) != Some(&value) {
                self.put_entry(key, value)?;
                stats.entries_written += 1;
            }
        }
        // 3. Flags, now that every entry they enable is in place.
        let ids: BTreeSet<u32> = flags.keys().chain(self.flags.keys()).copied().collect();
        for id in ids {
            let want = flags.get(&id).copied().unwrap_or(0);
            if self.flags.get(&id).copied().unwrap_or(0) != want {
                self.set_flags(id, want)?;
                stats.entries_written += 1;
            }
        }
        // 4. Entries no longer wanted.
        let stale: Vec<EntryKey> = self
            .entries
            .keys()
            .filter(|k| !entries.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            self.del_entry(key)?;
            stats.entries_removed += 1;
        }
        // 5. Prefixes no longer wanted.
        let stale: Vec<(IpAddr, u8)> = self
            .ipcache
            .keys()
            .filter(|k| !ipcache.contains_key(k))
            .copied()
            .collect();
        for (addr, len) in stale {
            ignore_missing(match addr {
                IpAddr::V4(a) => self.maps.ipcache.remove(&ipcache_key(a, len)),
                IpAddr::V6(a) => self.maps.ipcache6.remove(&ipcache6_key(a, len)),
            })
            .with_context(|| format!("deleting the ipcache entry {addr}/{len}"))?;
            self.ipcache.remove(&(addr, len));
            stats.ipcache_removed += 1;
        }
        if stats != PolicyStats::default() {
            debug!(?stats, "policy maps updated");
        }
        Ok(stats)
    }

    /// Clears an endpoint's flags, then its entries (an endpoint id the agent
    /// is about to reuse must start without policy).
    pub fn clear_endpoint(&mut self, endpoint_id: u32) -> anyhow::Result<()> {
        if self.flags.contains_key(&endpoint_id) {
            self.set_flags(endpoint_id, 0)?;
        }
        let mine: Vec<EntryKey> = self
            .entries
            .keys()
            .filter(|(k, _)| k.endpoint_id == endpoint_id)
            .copied()
            .collect();
        for key in mine {
            self.del_entry(key)?;
        }
        Ok(())
    }

    pub fn read_endpoint(&self, endpoint_id: u32) -> anyhow::Result<Option<EndpointPolicy>> {
        let flags = if endpoint_id < POLICY_EP_MAX {
            match self.maps.endpoints.get(&endpoint_id, 0) {
                Ok(f) => f,
                Err(e) => return Err(e).context("reading POLICY_EP"),
            }
        } else {
            0
        };
        let mut entries = Vec::new();
        for item in self.maps.policy.iter() {
            let (k, v) = item.context("reading POLICY")?;
            if k.data().endpoint_id == endpoint_id {
                entries.push((k.data(), k.prefix_len(), v));
            }
        }
        if flags == 0 && entries.is_empty() {
            return Ok(None);
        }
        Ok(Some(EndpointPolicy {
            ingress_enforced: flags & POLICY_EP_INGRESS != 0,
            egress_enforced: flags & POLICY_EP_EGRESS != 0,
            rules: rules_from_entries(entries),
        }))
    }

    pub fn read_ipcache(&self) -> anyhow::Result<BTreeMap<(IpAddr, u8), u32>> {
        read_ipcaches(&self.maps)
    }
}

/// What a rule is, ports aside: (direction, identity, deny, proto, rule_ref).
type RuleGroup = (Direction, u32, bool, u8, u32);

/// Turns entries back into rules: port prefixes of one (direction, identity,
/// kind, protocol, rule_ref) that touch are merged into ranges.
fn rules_from_entries(entries: Vec<(PolicyKey, u32, PolicyValue)>) -> Vec<PolicyRule> {
    let mut groups: BTreeMap<RuleGroup, Vec<(u32, u32)>> = BTreeMap::new();
    for (k, prefix, v) in entries {
        let direction = if k.direction == DIR_EGRESS {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let (proto, range) = if prefix <= POLICY_PREFIX_ANY_PROTO {
            (0, None)
        } else if prefix <= POLICY_PREFIX_PROTO {
            (k.proto, None)
        } else {
            let bits = prefix.min(POLICY_PREFIX_FULL) - POLICY_PREFIX_PROTO;
            let start = u16::from_be(k.port) as u32;
            (k.proto, Some((start, start + (1u32 << (16 - bits)) - 1)))
        };
        let ranges = groups
            .entry((
                direction,
                k.identity,
                k.kind == KIND_DENY,
                proto,
                v.rule_ref,
            ))
            .or_default();
        // "Any port" is kept as the full range; told apart below.
        ranges.push(range.unwrap_or((u32::MAX, u32::MAX)));
    }
    let mut rules = Vec::new();
    for ((direction, remote_identity, deny, proto, rule_ref), mut ranges) in groups {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.0 != u32::MAX && last.1 != u32::MAX && last.1 + 1 >= r.0 => {
                    last.1 = last.1.max(r.1);
                }
                _ => merged.push(r),
            }
        }
        for (start, end) in merged {
            let ports = if start == u32::MAX {
                PortRange::ANY
            } else {
                PortRange {
                    start: start as u16,
                    end: end as u16,
                }
            };
            rules.push(PolicyRule {
                direction,
                remote_identity,
                proto,
                ports,
                deny,
                rule_ref,
            });
        }
    }
    rules.sort();
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(prefixes: &[(u16, u32)]) -> Vec<u32> {
        let mut ports: Vec<u32> = prefixes
            .iter()
            .flat_map(|&(p, bits)| {
                let n = 1u32 << (16 - bits);
                (p as u32)..(p as u32 + n)
            })
            .collect();
        ports.sort_unstable();
        ports
    }

    #[test]
    fn port_ranges_split_into_minimal_prefixes() {
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(8080, 8087), vec![(8080, 13)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        let p = port_prefixes(1000, 1999);
        assert_eq!(covered(&p), (1000..=1999).collect::<Vec<_>>());
        // 1000-1007, 1008-1023, 1024-1535, 1536-1791, 1792-1919, 1920-1983,
        // 1984-1999: the largest aligned block at each step.
        assert_eq!(
            p,
            vec![
                (1000, 13),
                (1008, 12),
                (1024, 7),
                (1536, 8),
                (1792, 9),
                (1920, 10),
                (1984, 12)
            ]
        );
        assert_eq!(port_prefixes(1, 65535).len(), 16);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
        assert_eq!(covered(&port_prefixes(0, 0)), vec![0]);
    }

    #[test]
    fn entries_round_trip_into_rules() {
        let rules = vec![
            PolicyRule {
                direction: Direction::Ingress,
                remote_identity: 300,
                proto: IPPROTO_TCP,
                ports: PortRange {
                    start: 1000,
                    end: 1999,
                },
                deny: false,
                rule_ref: 7,
            },
            PolicyRule {
                direction: Direction::Egress,
                remote_identity: 0,
                proto: 0,
                ports: PortRange::ANY,
                deny: true,
                rule_ref: 8,
            },
            PolicyRule {
                direction: Direction::Egress,
                remote_identity: 2,
                proto: IPPROTO_UDP,
                ports: PortRange::ANY,
                deny: false,
                rule_ref: 9,
            },
        ];
        let mut entries = Vec::new();
        for r in &rules {
            for (k, prefix) in rule_entries(5, r).unwrap() {
                entries.push((
                    k,
                    prefix,
                    PolicyValue {
                        rule_ref: r.rule_ref,
                        flags: 0,
                    },
                ));
            }
        }
        let mut want = rules.clone();
        want.sort();
        assert_eq!(rules_from_entries(entries), want);
    }

    #[test]
    fn invalid_rules_are_refused() {
        let bad = [
            (0, PortRange::single(80)),
            (47, PortRange::single(1)),
            (IPPROTO_TCP, PortRange { start: 90, end: 80 }),
            (IPPROTO_ICMP, PortRange { start: 0, end: 256 }),
        ];
        for (proto, ports) in bad {
            let r = PolicyRule {
                direction: Direction::Ingress,
                remote_identity: 1,
                proto,
                ports,
                deny: false,
                rule_ref: 0,
            };
            assert!(rule_entries(1, &r).is_err(), "{r:?}");
        }
    }
}
