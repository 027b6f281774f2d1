//! The datapath's input: what the agent's compilers want programmed. Plain data,
//! no ids: the datapath allocates backend ids and reverse-NAT indices itself and
//! keeps them stable across updates so live flows keep their translation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => catena_common::IPPROTO_TCP,
            Proto::Udp => catena_common::IPPROTO_UDP,
            Proto::Sctp => catena_common::IPPROTO_SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            catena_common::IPPROTO_TCP => Some(Proto::Tcp),
            catena_common::IPPROTO_UDP => Some(Proto::Udp),
            catena_common::IPPROTO_SCTP => Some(Proto::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
}

/// A service frontend: `address:port/proto`. The address family is a type
/// parameter (IPv4 by default; [`Frontend6`] for IPv6) so the two families
/// live in separate, equally cheap sets and never mix in one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend<A = Ipv4Addr> {
    pub address: A,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr<A = Ipv4Addr> {
    pub address: A,
    pub port: u16,
}

/// An IPv6 frontend (`LB6_*` maps).
pub type Frontend6 = Frontend<Ipv6Addr>;
/// An IPv6 backend.
pub type BackendAddr6 = BackendAddr<Ipv6Addr>;
/// An IPv6 frontend's service.
pub type LbService6 = LbService<Ipv6Addr>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbService<A = Ipv4Addr> {
    /// `namespace/name` of the Service, for status output.
    pub name: String,
    /// Ordered, de-duplicated. Empty: the frontend rejects new connections.
    pub backends: Vec<BackendAddr<A>>,
    /// `sessionAffinity: ClientIP`: new connections from a client go to the
    /// backend its previous one used if that was at most this many seconds
    /// ago (`sessionAffinityConfig.clientIP.timeoutSeconds`). `None`: no
    /// affinity. `Some(0)` is treated as no affinity.
    pub affinity_timeout: Option<u32>,
    /// `Some`: the frontend has two scopes (Cilium's `SVC_FLAG_TWO_SCOPES`).
    /// Traffic arriving on an external device (`from_netdev`) picks from
    /// these backends, in-cluster clients (pods, node processes) from
    /// `backends`: e.g. a NodePort with `externalTrafficPolicy: Local` lists
    /// only this node's endpoints here and every endpoint in `backends`.
    /// An empty list refuses external clients.
    pub external_backends: Option<Vec<BackendAddr<A>>>,
}

// Not derived: a derive would require `A: Default`, which addresses are not
// meant to need.
impl<A> Default for LbService<A> {
    fn default() -> Self {
        LbService {
            name: String::new(),
            backends: Vec::new(),
            affinity_timeout: None,
            external_backends: None,
        }
    }
}

/// Everything the service maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbDesired {
    pub services: BTreeMap<Frontend, LbService>,
    /// Frontends (keys of `services`) that pick backends by Maglev
    /// consistent hashing of the flow's 5-tuple instead of at random
    /// (`--lb-algorithm maglev`, annotation `service.cilium.io/lb-algorithm`).
    pub maglev: BTreeSet<Frontend>,
    /// IPv6 frontends (dual-stack and IPv6-only Services).
    pub services6: BTreeMap<Frontend6, LbService6>,
    /// IPv6 frontends (keys of `services6`) that pick backends by Maglev,
    /// as `maglev` for IPv4.
    pub maglev6: BTreeSet<Frontend6>,
}
