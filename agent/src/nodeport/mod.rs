//! North-south traffic on the node's side: which devices are external (and
//! their addresses, the NodePort frontends) and the health-check node ports
//! load balancers probe. The translation itself is `compile::external` (the
//! frontends) and the datapath's `from_netdev` / `to_netdev`.

pub mod devices;
pub mod health;
