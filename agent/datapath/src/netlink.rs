//! A minimal synchronous rtnetlink client for the clsact fallback: list the
//! qdiscs of a device (to add clsact only when absent and to recognise a foreign
//! `ingress` qdisc), list the bpf filters of a clsact hook with their program
//! name and id, and delete one filter. aya 0.14 only exposes "add clsact with
//! NLM_F_EXCL", which cannot tell an existing clsact from an `ingress` qdisc.

use std::io;

use crate::netlink_socket::{align4, finish, header, Socket, NLMSG_HDRLEN};

const RTM_DELTFILTER: u16 = 45;
const RTM_GETQDISC: u16 = 38;
const RTM_GETTFILTER: u16 = 46;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// `TC_H_CLSACT` / `TC_H_INGRESS`: parent of both the clsact and ingress qdiscs.
pub const TC_H_CLSACT: u32 = 0xffff_fff1;
pub const TC_PARENT_INGRESS: u32 = 0xffff_fff2;
pub const TC_PARENT_EGRESS: u32 = 0xffff_fff3;

const TCMSG_LEN: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcObject {
    pub ifindex: i32,
    pub handle: u32,
    pub parent: u32,
    /// Filters: priority << 16 | protocol.
    pub info: u32,
    pub kind: String,
    pub bpf_name: Option<String>,
    pub bpf_prog_id: Option<u32>,
}

/// Sends one tc request (`struct tcmsg`) on `sock`.
fn send(sock: &Socket, msg_type: u16, flags: u16, tcm: &TcMsg) -> io::Result<()> {
    let mut buf = Vec::with_capacity(NLMSG_HDRLEN + TCMSG_LEN);
    header(&mut buf, msg_type, flags);
    buf.push(libc::AF_UNSPEC as u8);
    buf.extend_from_slice(&[0u8; 3]);
    buf.extend_from_slice(&tcm.ifindex.to_ne_bytes());
    buf.extend_from_slice(&tcm.handle.to_ne_bytes());
    buf.extend_from_slice(&tcm.parent.to_ne_bytes());
    buf.extend_from_slice(&tcm.info.to_ne_bytes());
    finish(&mut buf);
    sock.send(&buf)
}

/// The qdiscs or filters the kernel replies with (none for an ack).
fn receive(sock: &Socket, dump: bool) -> io::Result<Vec<TcObject>> {
    let mut out = Vec::new();
    sock.receive(dump, |payload| out.extend(parse_tc(payload)))?;
    Ok(out)
}

struct TcMsg {
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

fn parse_tc(payload: &[u8]) -> Option<TcObject> {
    if payload.len() < TCMSG_LEN {
        return None;
    }
    let word = |i: usize| u32::from_ne_bytes(payload[i..i + 4].try_into().unwrap());
    let mut obj = TcObject {
        ifindex: word(4) as i32,
        handle: word(8),
        parent: word(12),
        info: word(16),
        kind: String::new(),
        bpf_name: None,
        bpf_prog_id: None,
    };
    for (ty, value) in attrs(&payload[TCMSG_LEN..]) {
        match ty {
            TCA_KIND => obj.kind = c_string(value),
            TCA_OPTIONS => {
                for (ty, value) in attrs(value) {
                    match ty {
                        TCA_BPF_NAME => obj.bpf_name = Some(c_string(value)),
                        TCA_BPF_ID if value.len() >= 4 => {
                            obj.bpf_prog_id =
                                Some(u32::from_ne_bytes(value[..4].try_into().unwrap()))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(obj)
}

/// Iterates `struct rtattr`s: (type without flag bits, payload).
fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let value = &data[4..len];
        data = &data[align4(len).min(data.len())..];
        Some((ty, value))
    })
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Qdiscs of one device.
pub fn qdiscs(ifindex: u32) -> io::Result<Vec<TcObject>> {
    let sock = Socket::open(libc::NETLINK_ROUTE)?;
    let tcm = TcMsg {
        ifindex: ifindex as i32,
        handle: 0,
        parent: 0,
        info: 0,
    };
    send(&sock, RTM_GETQDISC, libc::NLM_F_DUMP as u16, &tcm)?;
    // Without strict checking the kernel dumps every device: filter here.
    Ok(receive(&sock, true)?
        .into_iter()
        .filter(|q| q.ifindex == ifindex as i32)
        .collect())
}

/// Filters attached under `parent` (TC_PARENT_INGRESS / TC_PARENT_EGRESS).
pub fn filters(ifindex: u32, parent: u32) -> io::Result<Vec<TcObject>> {
    let sock = Socket::open(libc::NETLINK_ROUTE)?;
    let tcm = TcMsg {
        ifindex: ifindex as i32,
        handle: 0,
        parent,
        info: 0,
    };
    send(&sock, RTM_GETTFILTER, libc::NLM_F_DUMP as u16, &tcm)?;
    receive(&sock, true)
}

pub fn delete_filter(filter: &TcObject) -> io::Result<()> {
    let sock = Socket::open(libc::NETLINK_ROUTE)?;
    let tcm = TcMsg {
        ifindex: filter.ifindex,
        handle: filter.handle,
        parent: filter.parent,
        info: filter.info,
    };
    send(&sock, RTM_DELTFILTER, libc::NLM_F_ACK as u16, &tcm)?;
    sock.receive(false, |_| {})
}
