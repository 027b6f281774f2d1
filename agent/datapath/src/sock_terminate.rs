//! Socket termination for the socket-level load balancer (Cilium's
//! "socket LB termination"). `cgroup/connect4|6` rewrites a ClusterIP to a
//! backend once, at connect(); from then on the kernel talks to the backend
//! directly and no map lookup ever happens again for that socket. So when a
//! backend leaves its Service, nothing in the datapath can end such a socket:
//! a connected UDP socket (every DNS client) keeps sending to the removed
//! backend forever, a TCP connection hangs until its own timeout. The tc path
//! resets such flows on their next packet; sockets need user space to do it.
//!
//! A pass: read `LB4_SOCK_REVNAT` / `LB6_SOCK_REVNAT` ((cookie, backend) ->
//! frontend, written by the connect/sendmsg hooks), look each frontend's
//! current backends up in the live service maps, and for every translation
//! whose backend is no longer among them, find the socket with that cookie
//! whose peer is that backend (`NETLINK_SOCK_DIAG` dump, filtered in the
//! kernel by peer address and port) and destroy it (`SOCK_DESTROY`). The
//! cookie is what makes it exact: a socket that connected to the pod's
//! address directly has the same peer but no translation, and survives; so
//! does an unconnected UDP socket (no peer), whose next sendmsg is
//! translated afresh anyway.
//!
//! Why sock_diag from user space rather than the `bpf_sock_destroy` kfunc
//! from a socket iterator: the kfunc path (BPF iterators plus kfunc calls)
//! is unproven with aya-ebpf and bpf-linker here, while SOCK_DESTROY is a
//! stable netlink ABI the kernel has (`CONFIG_INET_DIAG_DESTROY`).
//!
//! Sockets live in the network namespace of whoever opened them: the
//! node's (node processes; the agent's own namespace) and each local pod's
//! (the socket LB serves pods too when attached at the cgroup root).
//! sock_diag only sees the caller's namespace, so a pod's namespace is
//! entered on a short-lived thread of its own (setns moves only that thread).
//!
//! Passes run on one worker thread ([`SocketTerminator`]): a service apply
//! only leaves a request (requests coalesce), never waits for a pass.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use aya::maps::{HashMap, Map, MapData};
use catena_common::lb::{
    Backend4, Service4Key, Service4Value, SockRevNat4Key, SockRevNat4Value, SCOPE_INTERNAL,
};
use catena_common::lb6::{self, Backend6, Service6Key, SockRevNat6Key, SockRevNat6Value};
use catena_common::{map_names, IPPROTO_TCP, IPPROTO_UDP};

use crate::endpoints::not_found;
use crate::sock_diag::{self, DiagSocket};

/// One socket the socket LB translated: its cookie, the backend it was sent
/// to and the frontend it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockTranslation {
    pub cookie: u64,
    pub backend: SocketAddr,
    pub frontend: SocketAddr,
    /// The translating frontend's rev-NAT index: tells which protocol's
    /// frontend it was (each has its own index).
    pub rev_nat_index: u32,
}

/// A translation whose backend is no longer a backend of its frontend, per
/// protocol. The maps do not record the socket's protocol; the frontend's
/// rev-NAT index usually tells it (the live frontend with that index is the
/// one that translated). When no live frontend has it (the frontend was
/// removed, maybe re-created under a new index), both protocols are judged:
/// a TCP socket is stale when the TCP frontend is gone or lacks the
/// backend, whatever the UDP frontend of the same address and port holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleTranslation {
    pub translation: SockTranslation,
    pub tcp: bool,
    pub udp: bool,
}

/// What the live maps say about one frontend and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendBackends {
    /// The frontend's rev-NAT index and backends (empty: it has none and
    /// refuses).
    Known(u32, BTreeSet<SocketAddr>),
    /// No such frontend (the Service or port is gone).
    Absent,
    /// Could not be read consistently (the maps changed under the reads):
    /// nothing is judged stale on its account.
    Unknown,
}

/// The pure selection: which translations point at a backend their
/// frontend no longer has. `backends(frontend, proto)` is asked once per
/// frontend and protocol.
pub fn select_stale(
    translations: &[SockTranslation],
    mut backends: impl FnMut(SocketAddr, u8) -> FrontendBackends,
) -> Vec<StaleTranslation> {
    let mut cache: BTreeMap<(SocketAddr, u8), FrontendBackends> = BTreeMap::new();
    let mut out = Vec::new();
    for t in translations {
        for proto in [IPPROTO_TCP, IPPROTO_UDP] {
            cache
                .entry((t.frontend, proto))
                .or_insert_with(|| backends(t.frontend, proto));
        }
        let tcp_fe = &cache[&(t.frontend, IPPROTO_TCP)];
        let udp_fe = &cache[&(t.frontend, IPPROTO_UDP)];
        let translated_by = |fe: &FrontendBackends| matches!(fe, FrontendBackends::Known(rev, _) if *rev == t.rev_nat_index);
        let stale = |fe: &FrontendBackends| match fe {
            FrontendBackends::Known(_, set) => !set.contains(&t.backend),
            FrontendBackends::Absent => true,
            FrontendBackends::Unknown => false,
        };
        let (tcp, udp) = if translated_by(tcp_fe) {
            (stale(tcp_fe), false)
        } else if translated_by(udp_fe) {
            (false, stale(udp_fe))
        } else {
            (stale(tcp_fe), stale(udp_fe))
        };
        if tcp || udp {
            out.push(StaleTranslation {
                translation: *t,
                tcp,
                udp,
            });
        }
    }
    out
}

/// What to look for in each namespace: (backend, protocol) -> cookies.
type Targets = BTreeMap<(SocketAddr, u8), BTreeSet<u64>>;

fn targets(stale: &[StaleTranslation]) -> Targets {
    let mut out = Targets::new();
    for s in stale {
        let t = s.translation;
        for (proto, yes) in [(IPPROTO_TCP, s.tcp), (IPPROTO_UDP, s.udp)] {
            if yes {
                out.entry((t.backend, proto)).or_default().insert(t.cookie);
            }
        }
    }
    out
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Entries in the socket reverse-NAT maps.
    pub translations: usize,
    /// Those whose backend left its frontend.
    pub stale: usize,
    pub destroyed_tcp: usize,
    pub destroyed_udp: usize,
    /// Namespaces searched (the node's included).
    pub namespaces: usize,
    /// Reverse-NAT entries deleted afterwards.
    pub entries_deleted: usize,
    /// Dumps, destroys or namespaces that failed (each logged).
    pub errors: usize,
    pub took: Duration,
}

impl PassReport {
    pub fn destroyed(&self) -> usize {
        self.destroyed_tcp + self.destroyed_udp
    }
}

/// The maps a pass reads, opened from their pins (the worker does not share
/// the agent's `Datapath`, whose owner is busy applying).
struct PassMaps {
    revnat4: HashMap<MapData, SockRevNat4Key, SockRevNat4Value>,
    services4: HashMap<MapData, Service4Key, Service4Value>,
    backends4: HashMap<MapData, u32, Backend4>,
    revnat6: HashMap<MapData, SockRevNat6Key, SockRevNat6Value>,
    services6: HashMap<MapData, Service6Key, Service4Value>,
    backends6: HashMap<MapData, u32, Backend6>,
}

fn pinned<K: aya::Pod, V: aya::Pod>(
    maps: &Path,
    name: &str,
) -> anyhow::Result<HashMap<MapData, K, V>> {
    let path = maps.join(name);
    let data =
        MapData::from_pin(&path).with_context(|| format!("opening map {}", path.display()))?;
    let map = match data.info()?.map_type()? {
        aya::maps::MapType::LruHash => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    };
    HashMap::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl PassMaps {
    fn open(bpffs_dir: &Path) -> anyhow::Result<PassMaps> {
        let maps = crate::loader::Layout {
            root: bpffs_dir.to_path_buf(),
        }
        .maps();
        Ok(PassMaps {
            revnat4: pinned(&maps, map_names::LB4_SOCK_REVNAT)?,
            services4: pinned(&maps, map_names::LB4_SERVICES)?,
            backends4: pinned(&maps, map_names::LB4_BACKENDS)?,
            revnat6: pinned(&maps, map_names::LB6_SOCK_REVNAT)?,
            services6: pinned(&maps, map_names::LB6_SERVICES)?,
            backends6: pinned(&maps, map_names::LB6_BACKENDS)?,
        })
    }

    fn translations(&self) -> anyhow::Result<Vec<SockTranslation>> {
        let mut out = Vec::new();
        for entry in self.revnat4.iter() {
            match entry {
                Ok((k, v)) => out.push(SockTranslation {
                    cookie: k.cookie,
                    backend: v4(k.address, k.port),
                    frontend: v4(v.address, v.port),
                    rev_nat_index: v.rev_nat_index,
                }),
                // An LRU entry evicted while iterating.
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating LB4_SOCK_REVNAT"),
            }
        }
        for entry in self.revnat6.iter() {
            match entry {
                Ok((k, v)) => out.push(SockTranslation {
                    cookie: k.cookie,
                    backend: v6(&k.address, k.port),
                    frontend: v6(&v.address, v.port),
                    rev_nat_index: v.rev_nat_index,
                }),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).context("iterating LB6_SOCK_REVNAT"),
            }
        }
        Ok(out)
    }

    /// The internal-scope backends of a frontend (the scope the socket LB
    /// picks from), read slot by slot. The agent writes backends, then
    /// slots, then the master, and deletes slots last, so a slot or backend
    /// missing under a master that names it is an update in flight: read
    /// again a moment later, and give up (`Unknown`) rather than guess.
    fn backends_of(&self, frontend: SocketAddr, proto: u8) -> FrontendBackends {
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            match self.read_backends(frontend, proto) {
                Ok(Some((rev, set))) => return FrontendBackends::Known(rev, set),
                Ok(None) => return FrontendBackends::Absent,
                Err(e) => {
                    tracing::debug!(%frontend, proto, error = %format!("{e:#}"), "frontend read raced an update");
                }
            }
        }
        FrontendBackends::Unknown
    }

    fn read_backends(
        &self,
        frontend: SocketAddr,
        proto: u8,
    ) -> anyhow::Result<Option<(u32, BTreeSet<SocketAddr>)>> {
        let mut out = BTreeSet::new();
        let rev = match frontend.ip() {
            IpAddr::V4(a) => {
                let key = |slot| Service4Key {
                    address: u32::from_ne_bytes(a.octets()),
                    dport: frontend.port().to_be(),
                    backend_slot: slot,
                    proto,
                    scope: SCOPE_INTERNAL,
                    pad: [0; 2],
                };
                let Some(master) = get(&self.services4, &key(0))? else {
                    return Ok(None);
                };
                for slot in 1..=master.count {
                    let s = get(&self.services4, &key(slot))?.context("slot missing")?;
                    let b = get(&self.backends4, &s.backend_id)?.context("backend missing")?;
                    out.insert(v4(b.address, b.port));
                }
                master.rev_nat_index
            }
            IpAddr::V6(a) => {
                let key = |slot| Service6Key {
                    address: lb6::addr6_from_octets(&a.octets()),
                    dport: frontend.port().to_be(),
                    backend_slot: slot,
                    proto,
                    scope: SCOPE_INTERNAL,
                    pad: [0; 2],
                };
                let Some(master) = get(&self.services6, &key(0))? else {
                    return Ok(None);
                };
                for slot in 1..=master.count {
                    let s = get(&self.services6, &key(slot))?.context("slot missing")?;
                    let b = get(&self.backends6, &s.backend_id)?.context("backend missing")?;
                    out.insert(v6(&b.address, b.port));
                }
                master.rev_nat_index
            }
        };
        Ok(Some((rev, out)))
    }

    /// Deletes the reverse-NAT entry of a translation (gone already is fine).
    fn forget(&mut self, t: &SockTranslation) -> anyhow::Result<bool> {
        let res = match (t.backend.ip(), t.frontend.ip()) {
            (IpAddr::V4(b), IpAddr::V4(_)) => self.revnat4.remove(&SockRevNat4Key {
                cookie: t.cookie,
                address: u32::from_ne_bytes(b.octets()),
                port: t.backend.port().to_be(),
                pad: 0,
            }),
            (IpAddr::V6(b), _) => self.revnat6.remove(&SockRevNat6Key {
                cookie: t.cookie,
                address: lb6::addr6_from_octets(&b.octets()),
                port: t.backend.port().to_be(),
                pad: [0; 3],
            }),
            (IpAddr::V4(_), IpAddr::V6(_)) => return Ok(false),
        };
        match res {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(e).context("deleting a socket reverse-NAT entry"),
        }
    }
}

fn get<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
) -> anyhow::Result<Option<V>> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e).context("map lookup"),
    }
}

/// A map address (network order in memory) and port (network order).
fn v4(address: u32, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(address.to_ne_bytes()), u16::from_be(port)))
}

fn v6(address: &lb6::Addr6, port: u16) -> SocketAddr {
    SocketAddr::from((
        Ipv6Addr::from(lb6::addr6_octets(address)),
        u16::from_be(port),
    ))
}

/// One namespace's share of a pass.
#[derive(Debug, Default)]
struct NamespaceResult {
    /// (cookie, backend, protocol) of each socket destroyed.
    destroyed: Vec<(u64, SocketAddr, u8)>,
    errors: usize,
}

/// Finds and destroys the target sockets in the calling thread's namespace.
fn terminate_here(targets: &Targets, netns: &str) -> NamespaceResult {
    let mut res = NamespaceResult::default();
    for ((backend, proto), cookies) in targets {
        let states = if *proto == IPPROTO_TCP {
            sock_diag::tcp_live_states()
        } else {
            sock_diag::udp_connected_states()
        };
        // An IPv4 backend may be the IPv4-mapped peer of an IPv6 socket.
        let families: &[i32] = match backend {
            SocketAddr::V4(_) => &[libc::AF_INET, libc::AF_INET6],
            SocketAddr::V6(_) => &[libc::AF_INET6],
        };
        for family in families {
            let found = match sock_diag::dump_peer(
                *family as u8,
                *proto,
                states,
                (backend.ip(), backend.port()),
            ) {
                Ok(found) => found,
                // IPv6 compiled out or disabled in this namespace.
                Err(e) if *family == libc::AF_INET6 && unsupported(&e) => continue,
                Err(e) => {
                    tracing::warn!(netns, %backend, proto, family, error = %e, "sock_diag dump failed");
                    res.errors += 1;
                    continue;
                }
            };
            // The peer is checked again here: the kernel filter is the fast
            // path, the cookie and the peer together are the contract.
            let peer = (backend.ip(), backend.port());
            for s in found
                .iter()
                .filter(|s| s.peer() == peer && cookies.contains(&s.cookie()))
            {
                match destroy(s) {
                    Ok(()) => res.destroyed.push((s.cookie(), *backend, *proto)),
                    // Closed meanwhile: nothing left to end.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(netns, %backend, proto, cookie = s.cookie(), error = %e, "socket destroy failed");
                        res.errors += 1;
                    }
                }
            }
        }
    }
    res
}

fn destroy(s: &DiagSocket) -> io::Result<()> {
    sock_diag::destroy(s)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::EAFNOSUPPORT) | Some(libc::EOPNOTSUPP)
    )
}

/// (device, inode) of a namespace file: two paths, one namespace.
fn netns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Runs `terminate_here` on a new thread inside the namespace at `path`.
fn terminate_in(path: &Path, targets: &Targets) -> anyhow::Result<NamespaceResult> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.display().to_string();
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("sock-term-ns".into())
            .spawn_scoped(scope, || -> anyhow::Result<NamespaceResult> {
                // SAFETY: setns on an open netns fd; it moves only this
                // thread, which ends with this function.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error())
                        .with_context(|| format!("entering netns {name}"));
                }
                Ok(terminate_here(targets, &name))
            })
            .context("spawning a thread")?
            .join()
            .map_err(|_| anyhow::anyhow!("socket termination thread for {name} panicked"))?
    })
}

/// One pass over the namespaces `pod_netns` and the calling thread's own:
/// destroys every socket the socket LB translated to a backend its
/// frontend no longer has, then deletes the stale reverse-NAT entries, so
/// the next pass does not search for them again. A stale entry without a
/// socket found belongs to a closed socket (the LRU would age it out) or an
/// unconnected UDP one (its next sendmsg is translated afresh); after a
/// pass with errors those are kept, and the next pass tries again.
pub fn terminate_stale_sockets(
    bpffs_dir: &Path,
    pod_netns: &[PathBuf],
) -> anyhow::Result<PassReport> {
    let started = Instant::now();
    let mut maps = PassMaps::open(bpffs_dir)?;
    let translations = maps.translations()?;
    let stale = select_stale(&translations, |fe, proto| maps.backends_of(fe, proto));
    let mut report = PassReport {
        translations: translations.len(),
        stale: stale.len(),
        ..PassReport::default()
    };
    if stale.is_empty() {
        report.took = started.elapsed();
        return Ok(report);
    }
    let targets = targets(&stale);
    let mut destroyed: BTreeSet<(u64, SocketAddr)> = BTreeSet::new();
    let mut absorb = |r: NamespaceResult, report: &mut PassReport| {
        report.namespaces += 1;
        report.errors += r.errors;
        for (cookie, backend, proto) in r.destroyed {
            if proto == IPPROTO_TCP {
                report.destroyed_tcp += 1;
            } else {
                report.destroyed_udp += 1;
            }
            destroyed.insert((cookie, backend));
        }
    };
    // The node's own namespace: this thread is in it (the worker is never
    // moved), so no setns.
    absorb(terminate_here(&targets, "node"), &mut report);
    let mut seen: BTreeSet<(u64, u64)> = netns_id(Path::new("/proc/thread-self/ns/net"))
        .into_iter()
        .collect();
    for path in pod_netns {
        match netns_id(path) {
            Ok(id) if !seen.insert(id) => continue,
            Ok(_) => {}
            // The pod is being deleted; its sockets go with its namespace.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(netns = %path.display(), error = %e, "cannot stat pod netns");
                report.errors += 1;
                continue;
            }
        }
        match terminate_in(path, &targets) {
            Ok(r) => absorb(r, &mut report),
            Err(e) => {
                tracing::warn!(netns = %path.display(), error = %format!("{e:#}"), "cannot search pod netns");
                report.errors += 1;
            }
        }
    }
    for s in &stale {
        let t = &s.translation;
        if report.errors == 0 || destroyed.contains(&(t.cookie, t.backend)) {
            match maps.forget(t) {
                Ok(true) => report.entries_deleted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(cookie = t.cookie, backend = %t.backend, error = %format!("{e:#}"), "cannot delete socket reverse-NAT entry");
                    report.errors += 1;
                }
            }
        }
    }
    report.took = started.elapsed();
    Ok(report)
}

#[derive(Default)]
struct Pending {
    /// Pod namespaces of the latest request (a newer request replaces it).
    request: Option<Vec<PathBuf>>,
    stop: bool,
}

/// The worker thread that runs passes. [`SocketTerminator::request`] only
/// records the request and wakes the worker; requests made while a pass
/// runs coalesce into one more pass with the newest namespace list.
pub struct SocketTerminator {
    shared: Arc<(Mutex<Pending>, Condvar)>,
}

impl SocketTerminator {
    /// Starts the worker for the maps pinned under `bpffs_dir`. `on_pass`
    /// sees every pass's report (metrics); errors of a pass are logged.
    pub fn spawn(
        bpffs_dir: PathBuf,
        on_pass: impl Fn(&PassReport) + Send + 'static,
    ) -> io::Result<SocketTerminator> {
        let shared: Arc<(Mutex<Pending>, Condvar)> = Arc::default();
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("sock-terminate".into())
            .spawn(move || loop {
                let pods = {
                    let (lock, wake) = &*worker;
                    let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                    while p.request.is_none() && !p.stop {
                        p = wake.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    if p.stop {
                        return;
                    }
                    p.request.take().unwrap_or_default()
                };
                match terminate_stale_sockets(&bpffs_dir, &pods) {
                    Ok(r) if r.stale > 0 || r.errors > 0 => {
                        tracing::info!(
                            translations = r.translations,
                            stale = r.stale,
                            destroyed_tcp = r.destroyed_tcp,
                            destroyed_udp = r.destroyed_udp,
                            namespaces = r.namespaces,
                            entries_deleted = r.entries_deleted,
                            errors = r.errors,
                            took_us = r.took.as_micros() as u64,
                            "sockets to removed backends terminated"
                        );
                        on_pass(&r);
                    }
                    Ok(r) => {
                        tracing::debug!(
                            translations = r.translations,
                            took_us = r.took.as_micros() as u64,
                            "no socket to a removed backend"
                        );
                        on_pass(&r);
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "socket termination pass failed")
                    }
                }
            })?;
        Ok(SocketTerminator { shared })
    }

    /// Asks for a pass over the node's namespace and `pod_netns` (paths of
    /// local pods' network namespaces). Never blocks on a running pass.
    pub fn request(&self, pod_netns: Vec<PathBuf>) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).request = Some(pod_netns);
        wake.notify_one();
    }
}

impl Drop for SocketTerminator {
    fn drop(&mut self) {
        // The worker finishes its pass (if any) and exits; not joined, so
        // dropping never waits on one.
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A translation by the frontend with rev-NAT index `rev`.
    fn t(cookie: u64, backend: &str, frontend: &str, rev: u32) -> SockTranslation {
        SockTranslation {
            cookie,
            backend: sa(backend),
            frontend: sa(frontend),
            rev_nat_index: rev,
        }
    }

    fn known(rev: u32, backends: &[&str]) -> FrontendBackends {
        FrontendBackends::Known(rev, backends.iter().map(|b| sa(b)).collect())
    }

    /// A TCP-only frontend with index 1 (what most Services are).
    fn tcp_only(
        backends: &'static [&'static str],
    ) -> impl FnMut(SocketAddr, u8) -> FrontendBackends {
        move |_, proto| {
            if proto == IPPROTO_TCP {
                known(1, backends)
            } else {
                FrontendBackends::Absent
            }
        }
    }

    #[test]
    fn a_backend_still_in_its_frontend_is_not_stale() {
        let ts = [
            t(1, "10.0.0.1:8080", "10.96.0.1:80", 1),
            t(2, "10.0.0.2:8080", "10.96.0.1:80", 1),
        ];
        let stale = select_stale(&ts, tcp_only(&["10.0.0.1:8080", "10.0.0.2:8080"]));
        assert!(stale.is_empty(), "{stale:?}");
    }

    #[test]
    fn only_translations_to_the_removed_backend_are_stale() {
        let ts = [
            t(1, "10.0.0.1:8080", "10.96.0.1:80", 1),
            t(2, "10.0.0.2:8080", "10.96.0.1:80", 1),
            t(3, "10.0.0.1:8080", "10.96.0.1:80", 1),
        ];
        let stale = select_stale(&ts, tcp_only(&["10.0.0.2:8080"]));
        let cookies: Vec<u64> = stale.iter().map(|s| s.translation.cookie).collect();
        assert_eq!(cookies, [1, 3]);
        // The index says TCP: no UDP socket is searched for.
        assert!(stale.iter().all(|s| s.tcp && !s.udp), "{stale:?}");
    }

    #[test]
    fn staleness_is_per_protocol_and_per_frontend() {
        // 10.96.0.1:53 keeps backend .1 for UDP (index 2) but not for TCP
        // (index 1); the same backend behind another frontend stays.
        let ts = [
            t(1, "10.0.0.1:53", "10.96.0.1:53", 1),
            t(2, "10.0.0.1:53", "10.96.0.1:53", 2),
            t(3, "10.0.0.1:53", "10.96.0.2:53", 3),
        ];
        let stale = select_stale(&ts, |fe, proto| match (fe.to_string().as_str(), proto) {
            ("10.96.0.1:53", IPPROTO_UDP) => known(2, &["10.0.0.1:53"]),
            ("10.96.0.1:53", _) => known(1, &[]),
            (_, IPPROTO_TCP) => known(3, &["10.0.0.1:53"]),
            _ => FrontendBackends::Absent,
        });
        assert_eq!(
            stale,
            [StaleTranslation {
                translation: ts[0],
                tcp: true,
                udp: false
            }]
        );
        let targets = targets(&stale);
        assert_eq!(
            targets.into_iter().collect::<Vec<_>>(),
            [((sa("10.0.0.1:53"), IPPROTO_TCP), BTreeSet::from([1]))]
        );
    }

    #[test]
    fn a_removed_frontend_makes_its_translations_stale_an_unreadable_one_does_not() {
        let ts = [
            t(1, "10.0.0.1:80", "10.96.0.9:80", 4),
            t(2, "[fd00::1]:80", "[fd00:96::1]:80", 4),
        ];
        let stale = select_stale(&ts, |fe, _| {
            if fe.is_ipv4() {
                FrontendBackends::Absent
            } else {
                FrontendBackends::Unknown
            }
        });
        assert_eq!(stale.len(), 1);
        assert_eq!(
            (stale[0].translation.cookie, stale[0].tcp, stale[0].udp),
            (1, true, true)
        );
    }

    #[test]
    fn a_recreated_frontend_keeps_sockets_to_backends_it_still_has() {
        // The frontend was removed and came back under index 9: the index no
        // longer tells the protocol, so each protocol's frontend is asked.
        let ts = [
            t(1, "10.0.0.1:80", "10.96.0.1:80", 1),
            t(2, "10.0.0.2:80", "10.96.0.1:80", 1),
        ];
        let stale = select_stale(&ts, |_, proto| {
            if proto == IPPROTO_TCP {
                known(9, &["10.0.0.1:80"])
            } else {
                FrontendBackends::Absent
            }
        });
        // Socket 1 may be a TCP one (still a backend) or a UDP one (its
        // frontend is gone): only the UDP search is made.
        assert_eq!(
            stale
                .iter()
                .map(|s| (s.translation.cookie, s.tcp, s.udp))
                .collect::<Vec<_>>(),
            [(1, false, true), (2, true, true)]
        );
    }

    #[test]
    fn each_frontend_is_read_once_per_protocol() {
        let ts: Vec<_> = (0..50)
            .map(|i| t(i, "10.0.0.1:80", "10.96.0.1:80", 1))
            .collect();
        let mut reads = 0;
        let stale = select_stale(&ts, |_, _| {
            reads += 1;
            known(1, &["10.0.0.2:80"])
        });
        assert_eq!(stale.len(), 50);
        assert_eq!(reads, 2);
    }

    #[test]
    fn map_forms_round_trip() {
        let a: Ipv6Addr = "fd00::1:2".parse().unwrap();
        let addr = lb6::addr6_from_octets(&a.octets());
        assert_eq!(v6(&addr, 8080u16.to_be()), sa("[fd00::1:2]:8080"));
        let b = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(
            v4(u32::from_ne_bytes(b.octets()), 53u16.to_be()),
            sa("10.1.2.3:53")
        );
    }
}
