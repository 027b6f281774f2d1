//! The few bpf(2) commands aya 0.14 does not expose for our needs: creating
//! a TCX link by ifindex from any thread (aya's attach needs `&mut` program
//! and an interface name), pinning it, reading a TCX link's target (ifindex,
//! attach type) from a pin, swapping a link's program, and forcing a link's
//! detach.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
pub const BPF_LINK_TYPE_TCX: u32 = 11;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `BPF_MAP_UPDATE_BATCH`: writes `count` entries, keys and values packed
/// back to back in `keys` and `values`. `Err((written, error))` on failure:
/// the first `written` entries are in the map, the rest are not.
pub fn map_update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: u32,
) -> Result<(), (u32, io::Error)> {
    // union bpf_attr, `batch` member: in_batch, out_batch, keys, values,
    // count (u32) + map_fd (u32), elem_flags, flags.
    let mut attr = [0u64; 7];
    attr[2] = keys.as_ptr() as u64;
    attr[3] = values.as_ptr() as u64;
    attr[4] = u64::from(count) | (map.as_raw_fd() as u64) << 32;
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        // The kernel writes back how many it processed.
        Err(e) => Err(((attr[4] & 0xffff_ffff) as u32, e)),
    }
}

/// Filesystem magic of bpffs (`BPF_FS_MAGIC` in linux/magic.h).
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC` in linux/magic.h.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// One bpf(2) call with `attr` as the (zero-padded) `union bpf_attr`.
pub fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised buffer at least as large as the
    // union member the command reads; the kernel copies at most `size` bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 4];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins `fd` (a map, program or link) at `path` on a bpffs; fails with
/// `EEXIST` if something is pinned there already.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // union bpf_attr { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    let mut attr = [0u64; 4];
    attr[0] = path.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u32 as u64;
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Creates a TCX link running `prog` at `attach_type` ([`BPF_TCX_INGRESS`]
/// or [`BPF_TCX_EGRESS`]) of the device `ifindex` in the calling thread's
/// network namespace, appended after the programs already there (no
/// ordering flags). The link lives as long as the returned fd or a pin.
pub fn tcx_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    // struct { __u32 prog_fd; __u32 target_ifindex; __u32 attach_type;
    //          __u32 flags; struct { __u32 relative_fd; __u64 expected_revision; } tcx; }
    // (expected_revision 0: no revision check).
    let mut attr = [0u64; 8];
    attr[0] = (prog.as_raw_fd() as u32 as u64) | ((ifindex as u64) << 32);
    attr[1] = attach_type as u64; // flags (high half) 0
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The parts of `struct bpf_link_info` catena looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// TCX links: the attached device, 0 once the device is gone.
    pub tcx_ifindex: u32,
    pub tcx_attach_type: u32,
    /// Cgroup links: the cgroup's id, 0 once the cgroup is gone.
    pub cgroup_id: u64,
    pub cgroup_attach_type: u32,
}

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned
    // union whose `tcx` member is { ifindex: u32, attach_type: u32 } at 16
    // and whose `cgroup` member is { cgroup_id: u64, attach_type: u32 }.
    let mut info = [0u64; 16];
    let mut attr = [0u64; 2];
    // { __u32 bpf_fd; __u32 info_len; __aligned_u64 info; }
    attr[0] = (fd.as_raw_fd() as u32 as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: info[0] as u32,
        id: (info[0] >> 32) as u32,
        prog_id: info[1] as u32,
        tcx_ifindex: info[2] as u32,
        tcx_attach_type: (info[2] >> 32) as u32,
        cgroup_id: info[2],
        cgroup_attach_type: info[3] as u32,
    })
}

/// Atomically replaces the program of a link.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    let mut attr = [0u64; 2];
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((prog.as_raw_fd() as u32 as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Detaches a link from its hook even if other references (pins, fds) remain.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u64; 1];
    attr[0] = link.as_raw_fd() as u32 as u64;
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// f_type of the filesystem holding `path`.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs fills the zeroed struct; `c` outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

pub fn ifindex_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: plain libc call on a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => None,
        i => Some(i),
    }
}

pub fn ifname_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every (index, value) of a u32 array map in a few BPF_MAP_LOOKUP_BATCH
/// calls, instead of one lookup syscall per slot (65536 slots: ~0.3 s).
pub fn array_u32_batch(map: BorrowedFd<'_>, slots: u32) -> io::Result<Vec<(u32, u32)>> {
    const CHUNK: usize = 8192;
    let mut out = Vec::with_capacity(slots as usize);
    let mut keys = vec![0u32; CHUNK];
    let mut values = vec![0u32; CHUNK];
    let mut in_batch = 0u32;
    let mut out_batch = 0u32;
    let mut first = true;
    loop {
        // struct { in_batch, out_batch, keys, values; u32 count, map_fd;
        //          u64 elem_flags, flags } batch;
        let mut attr = [0u64; 7];
        attr[0] = if first {
            0
        } else {
            &in_batch as *const u32 as u64
        };
        attr[1] = &mut out_batch as *mut u32 as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = (CHUNK as u64) | ((map.as_raw_fd() as u32 as u64) << 32);
        let res = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let count = (attr[4] & 0xffff_ffff) as usize;
        out.extend(
            keys[..count]
                .iter()
                .copied()
                .zip(values[..count].iter().copied()),
        );
        match res {
            Ok(_) => {}
            // The end of the map (the last batch may still carry entries).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        in_batch = out_batch;
        first = false;
    }
}
