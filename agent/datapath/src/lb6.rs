//! IPv6 service maps (`LB6_SERVICES`, `LB6_BACKENDS`, `LB6_REVNAT`): the
//! [`Family`] that the shared load-balancer state (`lb_state`) programs
//! them through, with the same id allocation, diffing, write order and
//! rebuild-from-pins as IPv4. Backend ids and reverse-NAT indices are a
//! number space of their own (the IPv6 programs only look them up in the
//! IPv6 maps), so the IPv4 state and its writes are untouched by IPv6.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use catena_common::lb6::{addr6_from_octets, addr6_octets, Addr6, Backend6, RevNat6, Service6Key};
use catena_common::map_names;

use crate::lb_state::{self, BackendKey, Family};
use crate::{Frontend6, LbDesired, LbService6, Proto};

pub(crate) use crate::lb_state::warn_dirty;

/// One IPv6 frontend as programmed.
pub type ProgrammedService6 = crate::ProgrammedService<Ipv6Addr>;

pub(crate) fn addr_to_map(a: Ipv6Addr) -> Addr6 {
    // Network order as in the packet: the octets in memory order.
    addr6_from_octets(&a.octets())
}

pub(crate) fn addr_from_map(a: Addr6) -> Ipv6Addr {
    Ipv6Addr::from(addr6_octets(&a))
}

/// IPv6 service maps.
pub(crate) struct V6;

pub(crate) type LbMaps6 = lb_state::LbMaps<V6>;
pub(crate) type LbState6 = lb_state::LbState<V6>;

impl Family for V6 {
    type Addr = Ipv6Addr;
    type ServiceKey = Service6Key;
    type Backend = Backend6;
    type RevNat = RevNat6;
    const NAME: &'static str = "IPv6";
    const SERVICES_MAP: &'static str = map_names::LB6_SERVICES;
    const BACKENDS_MAP: &'static str = map_names::LB6_BACKENDS;
    const REVNAT_MAP: &'static str = map_names::LB6_REVNAT;
    // `from_netdev6_lb` reads the `SCOPE_EXTERNAL` entries of IPv6
    // NodePort / externalIP / LB frontends (externalTrafficPolicy differing
    // from internalTrafficPolicy); pods and node processes never do.
    const TWO_SCOPES: bool = true;

    fn services(desired: &LbDesired) -> &BTreeMap<Frontend6, LbService6> {
        &desired.services6
    }

    fn service_key(fe: &Frontend6, scope: u8, slot: u16) -> Service6Key {
        Service6Key {
            address: addr_to_map(fe.address),
            dport: fe.port.to_be(),
            backend_slot: slot,
            proto: fe.proto.number(),
            scope,
            pad: [0; 2],
        }
    }

    fn parse_service_key(k: &Service6Key) -> Option<(Frontend6, u8, u16)> {
        let fe = Frontend6 {
            address: addr_from_map(k.address),
            port: u16::from_be(k.dport),
            proto: Proto::from_number(k.proto)?,
        };
        Some((fe, k.scope, k.backend_slot))
    }

    fn backend_value(b: &BackendKey<Ipv6Addr>) -> Backend6 {
        Backend6 {
            address: addr_to_map(b.address),
            port: b.port.to_be(),
            proto: b.proto.number(),
            flags: 0,
        }
    }

    fn parse_backend(b: &Backend6) -> Option<BackendKey<Ipv6Addr>> {
        Some(BackendKey {
            address: addr_from_map(b.address),
            port: u16::from_be(b.port),
            proto: Proto::from_number(b.proto)?,
        })
    }

    fn revnat_value(fe: &Frontend6) -> RevNat6 {
        RevNat6 {
            address: addr_to_map(fe.address),
            port: fe.port.to_be(),
            pad: 0,
        }
    }
}
