//! The datapath's input: what the agent's compilers want programmed. Plain data,
//! no ids: the datapath allocates backend ids and reverse-NAT indices itself and
//! keeps them stable across updates so live flows keep their translation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

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

/// A service frontend: `address:port/proto` (a ClusterIP port today).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub address: Ipv4Addr,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbService {
    /// `namespace/name` of the Service, for status output.
    pub name: String,
    /// Ordered, de-duplicated. Empty: the frontend rejects new connections.
    pub backends: Vec<BackendAddr>,
    /// `sessionAffinity: ClientIP`: new connections from a client go to the
    /// backend its previous one used if that was at most this many seconds
    /// ago (`sessionAffinityConfig.clientIP.timeoutSeconds`). `None`: no
    /// affinity. `Some(0)` is treated as no affinity.
    pub affinity_timeout: Option<u32>,
}

/// Everything the service maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbDesired {
    pub services: BTreeMap<Frontend, LbService>,
    /// Frontends (keys of `services`) that pick backends by Maglev
    /// consistent hashing of the flow's 5-tuple instead of at random
    /// (`--lb-algorithm maglev`, annotation `service.cilium.io/lb-algorithm`).
    pub maglev: BTreeSet<Frontend>,
}
