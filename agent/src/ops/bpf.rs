//! Read-only (plus delete) access to catena's pinned maps, links and programs
//! through bpf(2), without the agent's datapath handle: scrapes, dumps and the
//! conntrack GC open their own fds on the pins, so they never wait for (or
//! block) CNI requests holding the agent's lock. aya 0.14 has no typed access
//! to an already pinned map by path, hence the few raw commands.

use anyhow::{bail, Context, Result};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// Upper bound on entries read from one map: the largest catena maps hold
/// 524288; a bound keeps a corrupted iteration from looping forever.
const MAX_ITER: usize = 1 << 20;

use catena_datapath::sys::{bpf, obj_get};

fn obj_info(fd: &OwnedFd, info: &mut [u64]) -> io::Result<()> {
    let mut attr = [0u64; 2];
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((std::mem::size_of_val(info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// A pinned map opened by path.
pub struct PinnedMap {
    fd: OwnedFd,
    pub name: String,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
}

impl PinnedMap {
    pub fn open(path: &Path) -> Result<PinnedMap> {
        let fd = obj_get(path).with_context(|| format!("opening pinned map {}", path.display()))?;
        // struct bpf_map_info: type, id, key_size, value_size, max_entries,
        // map_flags (u32 each), name[16], ...
        let mut info = [0u64; 12];
        obj_info(&fd, &mut info).with_context(|| format!("map info of {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(PinnedMap {
            fd,
            name,
            key_size: (info[1] & 0xffff_ffff) as usize,
            value_size: (info[1] >> 32) as usize,
            max_entries: (info[2] & 0xffff_ffff) as u32,
        })
    }

    /// Opens `<bpffs>/maps/<name>` and checks the key and value sizes `K`
    /// and `V` were built with, so a layout change can never be misread.
    pub fn open_typed<K, V>(bpffs: &Path, name: &str) -> Result<PinnedMap> {
        let map = PinnedMap::open(&bpffs.join("maps").join(name))?;
        if map.key_size != std::mem::size_of::<K>() || map.value_size != std::mem::size_of::<V>() {
            bail!(
                "pinned map {name} has key/value sizes {}/{}, this agent expects {}/{}",
                map.key_size,
                map.value_size,
                std::mem::size_of::<K>(),
                std::mem::size_of::<V>()
            );
        }
        Ok(map)
    }

    /// Every key, collected before anything is looked up or deleted (a hash
    /// map restarts its iteration when the cursor key disappears).
    pub fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        let mut cur: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; self.key_size];
            let mut attr = [0u64; 3];
            attr[0] = self.fd.as_raw_fd() as u32 as u64;
            attr[1] = cur.as_ref().map_or(0, |k| k.as_ptr() as u64);
            attr[2] = next.as_mut_ptr() as u64;
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e).with_context(|| format!("iterating {}", self.name)),
            }
            keys.push(next.clone());
            if keys.len() > MAX_ITER {
                bail!("{} yields more than {MAX_ITER} keys", self.name);
            }
            cur = Some(next);
        }
    }

    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_size];
        let mut attr = [0u64; 4];
        attr[0] = self.fd.as_raw_fd() as u32 as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.as_mut_ptr() as u64;
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up in {}", self.name)),
        }
    }

    /// Deletes `key`; false if it was already gone.
    pub fn delete(&self, key: &[u8]) -> Result<bool> {
        let mut attr = [0u64; 2];
        attr[0] = self.fd.as_raw_fd() as u32 as u64;
        attr[1] = key.as_ptr() as u64;
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("deleting from {}", self.name)),
        }
    }

    /// Every (key, value) pair; entries deleted meanwhile are skipped.
    pub fn entries(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for key in self.keys()? {
            if let Some(value) = self.lookup(&key)? {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// Typed entries.
    pub fn typed<K: Copy, V: Copy>(&self) -> Result<Vec<(K, V)>> {
        self.entries()?
            .into_iter()
            .map(|(k, v)| Ok((from_bytes::<K>(&k)?, from_bytes::<V>(&v)?)))
            .collect()
    }
}

/// Reads a `#[repr(C)]` plain-old-data value (catena_common's map types).
pub fn from_bytes<T: Copy>(bytes: &[u8]) -> Result<T> {
    if bytes.len() != std::mem::size_of::<T>() {
        bail!(
            "{} bytes for a {}-byte value",
            bytes.len(),
            std::mem::size_of::<T>()
        );
    }
    // SAFETY: the length matches and catena_common's map types are repr(C)
    // integers and byte arrays, valid for any bit pattern; read_unaligned
    // because a Vec<u8> is only byte-aligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The bytes of a plain-old-data key.
pub fn to_bytes<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: reading size_of::<T>() bytes of a live value; the map types
    // have explicit padding fields, so no byte is uninitialised.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
    .to_vec()
}

/// A pinned link, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub pin: String,
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// TCX links: the device (0 once it is gone).
    pub tcx_ifindex: u32,
}

impl LinkInfo {
    pub fn kind(&self) -> String {
        match self.link_type {
            BPF_LINK_TYPE_TCX => "tcx".into(),
            BPF_LINK_TYPE_CGROUP => "cgroup".into(),
            other => format!("type-{other}"),
        }
    }
}

fn link_info(fd: &OwnedFd, pin: String) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose
    // tcx member starts with the ifindex.
    let mut info = [0u64; 16];
    obj_info(fd, &mut info)?;
    Ok(LinkInfo {
        pin,
        link_type: info[0] as u32,
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        tcx_ifindex: if info[0] as u32 == BPF_LINK_TYPE_TCX {
            info[2] as u32
        } else {
            0
        },
    })
}

/// Every link pinned under `<bpffs>/links` (unreadable pins are skipped:
/// they are reported as missing links, which is what they are).
pub fn links(bpffs: &Path) -> Vec<LinkInfo> {
    let Ok(entries) = std::fs::read_dir(bpffs.join("links")) else {
        return vec![];
    };
    let mut out: Vec<LinkInfo> = entries
        .flatten()
        .filter_map(|e| {
            let pin = e.file_name().to_string_lossy().into_owned();
            let fd = obj_get(&e.path()).ok()?;
            link_info(&fd, pin).ok()
        })
        .collect();
    out.sort_by(|a, b| a.pin.cmp(&b.pin));
    out
}

/// Detaches the link pinned at `path` from its hook, whatever else still
/// holds it (other fds, the pin itself), then removes the pin.
pub fn detach_and_unpin_link(path: &Path) -> Result<()> {
    if let Ok(fd) = obj_get(path) {
        let mut attr = [0u64; 1];
        attr[0] = fd.as_raw_fd() as u32 as u64;
        // A link whose device or cgroup is gone is already detached.
        if let Err(e) = bpf(BPF_LINK_DETACH, &mut attr) {
            tracing::debug!(path = %path.display(), error = %e, "link detach");
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Program id and tag (hex) of a pinned program.
pub fn program_info(path: &Path) -> Result<(u32, String)> {
    let fd = obj_get(path).with_context(|| format!("opening {}", path.display()))?;
    // struct bpf_prog_info: type u32, id u32, tag[8], ...
    let mut info = [0u64; 32];
    obj_info(&fd, &mut info).with_context(|| format!("program info of {}", path.display()))?;
    let id = (info[0] >> 32) as u32;
    let tag = info[1]
        .to_ne_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((id, tag))
}

/// Nanoseconds on CLOCK_MONOTONIC, the clock of the datapath's timestamps
/// (`bpf_ktime_get_coarse_ns()`, which trails it by at most a tick).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
