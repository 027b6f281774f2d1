//! The node's own addresses and network namespace, as the socket-level load
//! balancer reads them (`NODE_ADDR4`, `NODE_ADDR6`, `NODE_NETNS`): a socket
//! call to one of these addresses on a NodePort is served by the NodePort's
//! wildcard frontend (see `ebpf/programs/src/node_addr.rs` for why a
//! wildcard plus this small set, not one frontend per address).
//!
//! The maps are not taken out of the `Ebpf` like the older ones: only these
//! methods use them (as for `DEVICES6`), so the datapath's fields stay as
//! they are.

use std::collections::BTreeSet;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context;
use aya::maps::{Array, HashMap, MapData, MapType};
use aya::Ebpf;
use catena_common::map_names;

use crate::endpoints::not_found;

/// (name, type, key size, value size) of the maps this module owns, checked
/// by the loader like every other map.
pub(crate) fn expected_maps() -> [(&'static str, MapType, usize, usize); 3] {
    [
        (
            map_names::NODE_ADDR4,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<u32>(),
        ),
        (
            map_names::NODE_ADDR6,
            MapType::Hash,
            size_of::<[u32; 4]>(),
            size_of::<u32>(),
        ),
        (
            map_names::NODE_NETNS,
            MapType::Array,
            size_of::<u32>(),
            size_of::<u64>(),
        ),
    ]
}

fn hash<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<HashMap<&'a mut MapData, K, u32>> {
    let map = ebpf
        .map_mut(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    HashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// What a sync changed, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrChanges {
    pub added: Vec<std::net::IpAddr>,
    pub removed: Vec<std::net::IpAddr>,
}

impl NodeAddrChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Brings hash map `name` in line with `want`, writing only what differs.
fn sync_set<K: aya::Pod + Ord, A: Copy + Into<std::net::IpAddr>>(
    ebpf: &mut Ebpf,
    name: &str,
    want: &BTreeSet<A>,
    to_map: impl Fn(A) -> K,
    from_map: impl Fn(K) -> A,
    changes: &mut NodeAddrChanges,
) -> anyhow::Result<()> {
    let mut map = hash::<K>(ebpf, name)?;
    let mut have = BTreeSet::new();
    for item in map.keys() {
        match item {
            Ok(k) => {
                have.insert(k);
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("iterating {name}")),
        }
    }
    let want_keys: BTreeSet<K> = want.iter().map(|a| to_map(*a)).collect();
    for k in want_keys.difference(&have) {
        map.insert(*k, 0, 0)
            .with_context(|| format!("writing {name}[{}]", from_map(*k).into()))?;
        changes.added.push(from_map(*k).into());
    }
    for k in have.difference(&want_keys) {
        match map.remove(k) {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("deleting {name}[{}]", from_map(*k).into()))
            }
        }
        changes.removed.push(from_map(*k).into());
    }
    Ok(())
}

impl crate::Datapath {
    /// Makes `v4` and `v6` the node's own addresses (`NODE_ADDR4`,
    /// `NODE_ADDR6`), writing only what differs (this runs every second).
    pub fn sync_node_addresses(
        &mut self,
        v4: &BTreeSet<Ipv4Addr>,
        v6: &BTreeSet<Ipv6Addr>,
    ) -> anyhow::Result<NodeAddrChanges> {
        let mut changes = NodeAddrChanges::default();
        sync_set(
            &mut self.ebpf,
            map_names::NODE_ADDR4,
            v4,
            crate::lb::addr_to_map,
            crate::lb::addr_from_map,
            &mut changes,
        )?;
        sync_set(
            &mut self.ebpf,
            map_names::NODE_ADDR6,
            v6,
            crate::lb6::addr_to_map,
            crate::lb6::addr_from_map,
            &mut changes,
        )?;
        Ok(changes)
    }

    /// The node's network namespace cookie as programmed (0: none yet).
    pub fn node_netns(&mut self) -> anyhow::Result<u64> {
        let map = self
            .ebpf
            .map_mut(map_names::NODE_NETNS)
            .context("the eBPF object has no map NODE_NETNS")?;
        let array: Array<&mut MapData, u64> =
            Array::try_from(map).context("map NODE_NETNS has an unexpected type")?;
        array.get(&0, 0).context("reading NODE_NETNS[0]")
    }

    /// Records the cookie of the node's network namespace, whose loopback
    /// addresses serve NodePorts (0: loopback NodePorts off).
    pub fn set_node_netns(&mut self, cookie: u64) -> anyhow::Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::NODE_NETNS)
            .context("the eBPF object has no map NODE_NETNS")?;
        let mut array: Array<&mut MapData, u64> =
            Array::try_from(map).context("map NODE_NETNS has an unexpected type")?;
        array.set(0, cookie, 0).context("writing NODE_NETNS[0]")
    }
}
