//! Refusing a new IPv6 flow to a frontend without backends, as a host with a
//! closed port would (the IPv6 twin of `reject`): a TCP SYN becomes the
//! RST|ACK the client expects, a UDP datagram an ICMPv6 destination
//! unreachable / port unreachable (RFC 4443 3.1) quoting the datagram's IPv6
//! and UDP headers. The packet is rewritten in place, with full checksums
//! (pseudo header included) computed here, and sent back to the pod.

use aya_ebpf::{helpers::bpf_skb_change_tail, programs::TcContext};
use catena_common::{IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    nat,
    parse::{Flow6, ETH_HLEN},
    reject::{fold, sum16},
};

const IP6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const RST_LEN: u32 = (ETH_HLEN + IP6_HLEN + TCP_HLEN) as u32;

/// ICMPv6 header (type, code, checksum, 4 unused bytes), then the quote:
/// the datagram's IPv6 header and UDP header, all the client's stack needs
/// to find the socket.
const ICMP6_HLEN: usize = 8;
const QUOTE_LEN: usize = IP6_HLEN + 8;
const ICMP6_MSG_LEN: usize = ICMP6_HLEN + QUOTE_LEN;
const ICMP_LEN: u32 = (ETH_HLEN + IP6_HLEN + ICMP6_MSG_LEN) as u32;
const ICMP6_DST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    ports: [u16; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    doff: u8,
    flags: u8,
}

/// Writes the fixed IPv6 header of an answer from `flow`'s destination to
/// its source (version 6, hop limit 64) and returns the pseudo-header sum
/// (RFC 8200 8.1) for its L4 checksum.
#[inline(always)]
fn write_answer_header(
    ctx: &TcContext,
    flow: &Flow6,
    payload_len: usize,
    next_header: u8,
) -> Result<u32, ()> {
    let mut hdr = [0u32; 10];
    hdr[0] = u32::from_ne_bytes([0x60, 0, 0, 0]);
    let len = (payload_len as u16).to_be_bytes();
    hdr[1] = u32::from_ne_bytes([len[0], len[1], next_header, 64]);
    let mut acc = payload_len as u32 + next_header as u32;
    let mut i = 0;
    while i < 4 {
        hdr[2 + i] = flow.daddr[i];
        hdr[6 + i] = flow.saddr[i];
        acc = sum16(&flow.daddr[i].to_ne_bytes(), acc);
        acc = sum16(&flow.saddr[i].to_ne_bytes(), acc);
        i += 1;
    }
    ctx.store(ETH_HLEN, &hdr, 0).map_err(|_| ())?;
    Ok(acc)
}

/// RST|ACK for a SYN (without ACK); `Ok(None)` for other segments.
#[inline(always)]
fn tcp_reset(ctx: &TcContext, flow: &Flow6) -> Result<Option<i32>, ()> {
    let tcp: TcpHead = ctx.load(Flow6::L4_OFF).map_err(|_| ())?;
    if tcp.flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Ok(None);
    }
    // RFC 9293 3.10.7.1: ack = SEG.SEQ + SEG.LEN (SYN and FIN count one).
    let tcp_hlen = ((tcp.doff >> 4) as u32) * 4;
    let data = (flow.payload_len as u32).saturating_sub(tcp_hlen);
    let seg_len = data + 1 + (tcp.flags & TCP_FIN != 0) as u32;
    let ack = u32::from_be_bytes(tcp.seq).wrapping_add(seg_len);

    // SAFETY: the program's own skb; the length covers the headers.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST_LEN, 0) } != 0 {
        return Err(());
    }
    let pseudo = write_answer_header(ctx, flow, TCP_HLEN, IPPROTO_TCP)?;
    let mut t = [0u8; TCP_HLEN];
    t[0..2].copy_from_slice(&tcp.ports[1].to_ne_bytes());
    t[2..4].copy_from_slice(&tcp.ports[0].to_ne_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_RST | TCP_ACK;
    let csum = fold(sum16(&t, pseudo));
    t[16..18].copy_from_slice(&csum.to_be_bytes());
    ctx.store(Flow6::L4_OFF, &t, 0).map_err(|_| ())?;
    nat::bounce(ctx).map(Some)
}

/// ICMPv6 port unreachable for a UDP datagram.
#[inline(always)]
fn udp_unreachable(ctx: &TcContext, flow: &Flow6) -> Result<Option<i32>, ()> {
    let quote: [u8; QUOTE_LEN] = ctx.load(ETH_HLEN).map_err(|_| ())?;
    // SAFETY: the program's own skb; the length covers the headers.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, ICMP_LEN, 0) } != 0 {
        return Err(());
    }
    let pseudo = write_answer_header(ctx, flow, ICMP6_MSG_LEN, IPPROTO_ICMPV6)?;
    let head = [ICMP6_DST_UNREACH, ICMP6_PORT_UNREACH];
    let csum = fold(sum16(&quote, sum16(&head, pseudo)));
    let mut icmp = [0u8; ICMP6_HLEN];
    icmp[0] = ICMP6_DST_UNREACH;
    icmp[1] = ICMP6_PORT_UNREACH;
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    ctx.store(Flow6::L4_OFF, &icmp, 0).map_err(|_| ())?;
    ctx.store(Flow6::L4_OFF + ICMP6_HLEN, &quote, 0)
        .map_err(|_| ())?;
    nat::bounce(ctx).map(Some)
}

/// RST for a TCP SYN, ICMPv6 port unreachable for UDP. `Ok(Some)`: the
/// verdict of the sent answer; `Ok(None)`: nothing to answer (the caller
/// drops).
#[inline(always)]
pub fn refuse(ctx: &TcContext, flow: &Flow6) -> Result<Option<i32>, ()> {
    match flow.proto {
        IPPROTO_TCP => tcp_reset(ctx, flow),
        IPPROTO_UDP => udp_unreachable(ctx, flow),
        _ => Ok(None),
    }
}
