//! What the kernel says is attached at a device's TCX hooks (BPF_PROG_QUERY),
//! so tests can tell "catena attached" from "nothing attached" without
//! trusting catena's own bookkeeping. bpftool 7.1 cannot show TCX per device.

use crate::netns::Netns;
use anyhow::{bail, Context, Result};

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// Number of programs attached via TCX at (ingress, egress) of `ifname` in `ns`.
/// A device with no TCX entry at all reports (0, 0).
pub fn tcx_program_counts(ns: &Netns, ifname: &str) -> Result<(u32, u32)> {
    let ifname = ifname.to_string();
    ns.enter_thread(move || -> Result<(u32, u32)> {
        let c = std::ffi::CString::new(ifname.clone())?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if ifindex == 0 {
            bail!("no device {ifname}");
        }
        Ok((
            query(ifindex, BPF_TCX_INGRESS)?,
            query(ifindex, BPF_TCX_EGRESS)?,
        ))
    })?
    .context("querying TCX programs")
}

fn query(ifindex: u32, attach_type: u32) -> Result<u32> {
    // union bpf_attr, query part: target_ifindex u32 @0, attach_type u32 @4,
    // query_flags u32 @8, attach_flags u32 @12, prog_ids u64 @16,
    // prog_cnt u32 @24, then link/revision fields (left zero).
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&ifindex.to_ne_bytes());
    attr[4..8].copy_from_slice(&attach_type.to_ne_bytes());
    // SAFETY: the kernel reads/writes at most `size` bytes of `attr`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // No TCX entry on the device yet.
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(0);
        }
        bail!("BPF_PROG_QUERY(ifindex {ifindex}, type {attach_type}): {e}");
    }
    Ok(u32::from_ne_bytes(
        attr[24..28].try_into().expect("4 bytes"),
    ))
}
