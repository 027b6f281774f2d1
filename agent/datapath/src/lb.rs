//! IPv4 service maps (`LB4_SERVICES`, `LB4_BACKENDS`, `LB4_REVNAT`): the
//! [`Family`] that the shared load-balancer state (`lb_state`) programs
//! them through. IPv4 frontends may also pick backends by Maglev: their
//! tables are written by `maglev.rs` from [`LbState::frontend`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::maps::MapError;
use catena_common::lb::{Backend4, RevNat4, Service4Key};
use catena_common::map_names;

use crate::lb_state::{self, BackendKey, Family};
use crate::{Frontend, LbDesired, LbService, Proto};

pub(crate) use crate::lb_state::warn_dirty;

pub(crate) fn addr_to_map(a: Ipv4Addr) -> u32 {
    // Network order as in the packet: the octets in memory order.
    u32::from_ne_bytes(a.octets())
}

pub(crate) fn addr_from_map(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

pub(crate) fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// IPv4 service maps.
pub(crate) struct V4;

pub(crate) type LbMaps = lb_state::LbMaps<V4>;
pub(crate) type LbState = lb_state::LbState<V4>;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type ServiceKey = Service4Key;
    type Backend = Backend4;
    type RevNat = RevNat4;
    const NAME: &'static str = "IPv4";
    const SERVICES_MAP: &'static str = map_names::LB4_SERVICES;
    const BACKENDS_MAP: &'static str = map_names::LB4_BACKENDS;
    const REVNAT_MAP: &'static str = map_names::LB4_REVNAT;
    const TWO_SCOPES: bool = true;

    fn services(desired: &LbDesired) -> &BTreeMap<Frontend, LbService> {
        &desired.services
    }

    fn service_key(fe: &Frontend, scope: u8, slot: u16) -> Service4Key {
        Service4Key {
            address: addr_to_map(fe.address),
            dport: fe.port.to_be(),
            backend_slot: slot,
            proto: fe.proto.number(),
            scope,
            pad: [0; 2],
        }
    }

    fn parse_service_key(k: &Service4Key) -> Option<(Frontend, u8, u16)> {
        let fe = Frontend {
            address: addr_from_map(k.address),
            port: u16::from_be(k.dport),
            proto: Proto::from_number(k.proto)?,
        };
        Some((fe, k.scope, k.backend_slot))
    }

    fn backend_value(b: &BackendKey<Ipv4Addr>) -> Backend4 {
        Backend4 {
            address: addr_to_map(b.address),
            port: b.port.to_be(),
            proto: b.proto.number(),
            flags: 0,
        }
    }

    fn parse_backend(b: &Backend4) -> Option<BackendKey<Ipv4Addr>> {
        Some(BackendKey {
            address: addr_from_map(b.address),
            port: u16::from_be(b.port),
            proto: Proto::from_number(b.proto)?,
        })
    }

    fn revnat_value(fe: &Frontend) -> RevNat4 {
        RevNat4 {
            address: addr_to_map(fe.address),
            port: fe.port.to_be(),
            pad: 0,
        }
    }
}
