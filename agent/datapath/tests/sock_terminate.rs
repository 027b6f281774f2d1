//! A socket-termination pass against real pinned maps: the frontend's
//! backends are read from the live service maps, translations to a removed
//! backend are selected and their entries deleted (no sockets exist for
//! these synthetic cookies, so nothing is destroyed), translations to the
//! remaining backend are left alone. Prints the pass's cost for many
//! entries (a measurement, not an assertion).

mod common;

use std::net::Ipv4Addr;

use aya::maps::{HashMap, Map, MapData};
use catena_common::lb::{SockRevNat4Key, SockRevNat4Value};
use catena_datapath::sock_terminate::terminate_stale_sockets;
use catena_datapath::{BackendAddr, Datapath, Frontend, LbDesired, LbService, Proto};
use common::BpffsDir;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const KEPT: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const REMOVED: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 3);
const ENTRIES: u64 = 20_000;

fn desired(backends: &[Ipv4Addr]) -> LbDesired {
    let mut d = LbDesired::default();
    d.services.insert(
        Frontend {
            address: VIP,
            port: 80,
            proto: Proto::Tcp,
        },
        LbService {
            name: "default/web".into(),
            backends: backends
                .iter()
                .map(|a| BackendAddr {
                    address: *a,
                    port: 8080,
                })
                .collect(),
            affinity_timeout: None,
            external_backends: None,
        },
    );
    d
}

fn revnat(bpffs: &BpffsDir) -> HashMap<MapData, SockRevNat4Key, SockRevNat4Value> {
    let data = MapData::from_pin(bpffs.path().join("maps/LB4_SOCK_REVNAT")).unwrap();
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

#[test]
fn a_pass_forgets_translations_to_removed_backends_only() {
    let bpffs = BpffsDir::new();
    let mut dp = Datapath::open(bpffs.path()).unwrap();
    dp.apply_services(&desired(&[KEPT, REMOVED])).unwrap();
    let rev_nat_index = dp.services()[0].rev_nat_index;
    let mut map = revnat(&bpffs);
    for cookie in 1..=ENTRIES {
        let backend = if cookie % 2 == 0 { KEPT } else { REMOVED };
        let key = SockRevNat4Key {
            cookie: u64::MAX - cookie, // far from any live socket's cookie
            address: u32::from_ne_bytes(backend.octets()),
            port: 8080u16.to_be(),
            pad: 0,
        };
        let value = SockRevNat4Value {
            address: u32::from_ne_bytes(VIP.octets()),
            port: 80u16.to_be(),
            rev_nat_index,
            pad: 0,
        };
        map.insert(key, value, 0).unwrap();
    }

    // Nothing is stale while both are backends.
    let r = terminate_stale_sockets(bpffs.path(), &[]).unwrap();
    assert_eq!((r.translations as u64, r.stale), (ENTRIES, 0), "{r:?}");

    dp.apply_services(&desired(&[KEPT])).unwrap();
    let r = terminate_stale_sockets(bpffs.path(), &[]).unwrap();
    eprintln!(
        "pass over {} translations ({} stale, node netns only): {:?}",
        r.translations, r.stale, r.took
    );
    assert_eq!(r.stale as u64, ENTRIES / 2, "{r:?}");
    assert_eq!((r.destroyed(), r.errors), (0, 0), "{r:?}");
    assert_eq!(r.entries_deleted as u64, ENTRIES / 2, "{r:?}");
    let left: Vec<SockRevNat4Key> = map.keys().map(Result::unwrap).collect();
    assert_eq!(left.len() as u64, ENTRIES / 2);
    assert!(left
        .iter()
        .all(|k| k.address == u32::from_ne_bytes(KEPT.octets())));

    // A removed frontend makes the rest stale.
    dp.apply_services(&LbDesired::default()).unwrap();
    let r = terminate_stale_sockets(bpffs.path(), &[]).unwrap();
    assert_eq!(r.entries_deleted as u64, ENTRIES / 2, "{r:?}");
    assert_eq!(map.keys().count(), 0);
}
