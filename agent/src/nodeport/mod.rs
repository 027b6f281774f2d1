//! North-south traffic on the node's side: which devices are external (and
//! their addresses, the NodePort frontends) and the health-check node ports
//! load balancers probe, and the node's own addresses (NodePorts reached
//! from the node and its pods). The translation itself is `compile::external` (the
//! frontends) and the datapath's `from_netdev` / `to_netdev`.

pub mod devices;
pub mod health;
pub mod node_addresses;
