//! Rejecting a new flow to a service without backends, the way a host with a
//! closed port would, so the client fails at once instead of retrying for a
//! minute or more: a TCP SYN is turned into the RST|ACK the pod's stack
//! expects (`connect()` fails with ECONNREFUSED), a UDP datagram into an ICMP
//! port unreachable (a connected UDP socket's next call fails with
//! ECONNREFUSED; a DNS resolver moves on). Either is sent back out of the
//! host veth the packet came in on.
//!
//! The packet is rewritten in place (no allocation): truncated to
//! Ethernet + 20-byte IPv4 + 20-byte TCP, then both headers are written whole
//! with full checksums computed here. A SYN from the pod's stack may carry
//! CHECKSUM_PARTIAL; the pod's stack accepts such a packet without checking
//! the L4 sum, and one without it (or a capture) sees a correct full sum.

use aya_ebpf::{helpers::bpf_skb_change_tail, programs::TcContext};
use catena_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    nat,
    parse::{Flow4, ETH_HLEN},
};

const IP_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const RST_LEN: u32 = (ETH_HLEN + IP_HLEN + TCP_HLEN) as u32;

/// ICMP header, then the offending datagram's IPv4 header and its first 8
/// bytes (RFC 792), which is all the client's stack needs to find the socket.
const ICMP_HLEN: usize = 8;
const QUOTE_LEN: usize = IP_HLEN + 8;
const ICMP_LEN: u32 = (ETH_HLEN + IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u32;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The parts of the offending SYN the RST needs.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    ports: [u16; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    doff: u8,
    flags: u8,
}

/// One's-complement sum of big-endian 16-bit words, not yet folded.
#[inline(always)]
pub(crate) fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    acc
}

#[inline(always)]
pub(crate) fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Answers a SYN (without ACK) with RST|ACK and returns `TC_ACT_REDIRECT`;
/// `Ok(None)` for any other TCP segment (the caller drops it: only a SYN
/// proves the sender is waiting for an answer to a new connection).
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, flow: &Flow4) -> Result<Option<i32>, ()> {
    if flow.proto != IPPROTO_TCP {
        return Ok(None);
    }
    let tcp: TcpHead = ctx.load(flow.l4_off).map_err(|_| ())?;
    if tcp.flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return Ok(None);
    }
    let tot_len: [u8; 2] = ctx.load(ETH_HLEN + 2).map_err(|_| ())?;
    // RFC 9293 3.10.7.1: to a segment without ACK, answer seq 0 and
    // ack = SEG.SEQ + SEG.LEN, where SYN (and FIN) count one each and any
    // data (TCP Fast Open) counts its length.
    let ip_hlen = flow.l4_off - ETH_HLEN;
    let tcp_hlen = ((tcp.doff >> 4) as usize) * 4;
    let data = (u16::from_be_bytes(tot_len) as usize)
        .saturating_sub(ip_hlen)
        .saturating_sub(tcp_hlen) as u32;
    let seg_len = data + 1 + (tcp.flags & TCP_FIN != 0) as u32;
    let ack = u32::from_be_bytes(tcp.seq).wrapping_add(seg_len);

    // SAFETY: the program's own skb; the length is above the headers' size.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, RST_LEN, 0) } != 0 {
        return Err(());
    }

    let src = flow.daddr.to_ne_bytes();
    let dst = flow.saddr.to_ne_bytes();
    let mut hdr = [0u8; IP_HLEN + TCP_HLEN];
    // IPv4: version 4, IHL 5, total 40, DF, TTL 64, TCP.
    hdr[0] = 0x45;
    hdr[2..4].copy_from_slice(&((IP_HLEN + TCP_HLEN) as u16).to_be_bytes());
    hdr[6] = 0x40;
    hdr[8] = 64;
    hdr[9] = IPPROTO_TCP;
    hdr[12..16].copy_from_slice(&src);
    hdr[16..20].copy_from_slice(&dst);
    let ip_csum = fold(sum16(&hdr[..IP_HLEN], 0));
    hdr[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    // TCP: ports swapped (already network order in memory), seq 0, the ack
    // above, data offset 5, RST|ACK, window 0.
    let t = IP_HLEN;
    hdr[t..t + 2].copy_from_slice(&tcp.ports[1].to_ne_bytes());
    hdr[t + 2..t + 4].copy_from_slice(&tcp.ports[0].to_ne_bytes());
    hdr[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    hdr[t + 12] = 5 << 4;
    hdr[t + 13] = TCP_RST | TCP_ACK;
    // Pseudo header: addresses, protocol, TCP length.
    let pseudo = sum16(&hdr[12..20], IPPROTO_TCP as u32 + TCP_HLEN as u32);
    let tcp_csum = fold(sum16(&hdr[t..], pseudo));
    hdr[t + 16..t + 18].copy_from_slice(&tcp_csum.to_be_bytes());

    ctx.store(ETH_HLEN, &hdr, 0).map_err(|_| ())?;
    nat::bounce(ctx).map(Some)
}

/// Refuses a new flow to a frontend without backends: RST for a TCP SYN,
/// ICMP port unreachable for UDP. `Ok(None)`: nothing to answer (the caller
/// drops the packet).
#[inline(always)]
pub fn refuse(ctx: &TcContext, flow: &Flow4) -> Result<Option<i32>, ()> {
    match flow.proto {
        IPPROTO_TCP => tcp_reset(ctx, flow),
        IPPROTO_UDP => udp_unreachable(ctx, flow),
        _ => Ok(None),
    }
}

/// Answers a UDP datagram with ICMP destination unreachable / port
/// unreachable from the frontend address and returns `TC_ACT_REDIRECT`.
/// `Ok(None)` for a datagram with IP options (not quoted here; the caller
/// drops it, and the client times out as before).
#[inline(always)]
pub fn udp_unreachable(ctx: &TcContext, flow: &Flow4) -> Result<Option<i32>, ()> {
    if flow.proto != IPPROTO_UDP || flow.l4_off != ETH_HLEN + IP_HLEN {
        return Ok(None);
    }
    // The quote: the datagram's IPv4 header and UDP header, as sent.
    let quote: [u8; QUOTE_LEN] = ctx.load(ETH_HLEN).map_err(|_| ())?;

    // SAFETY: the program's own skb; the new length covers the headers.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, ICMP_LEN, 0) } != 0 {
        return Err(());
    }

    let src = flow.daddr.to_ne_bytes();
    let dst = flow.saddr.to_ne_bytes();
    let mut hdr = [0u8; IP_HLEN + ICMP_HLEN + QUOTE_LEN];
    // IPv4: version 4, IHL 5, no DF (an ICMP error may be fragmented), TTL 64.
    hdr[0] = 0x45;
    hdr[2..4].copy_from_slice(&((IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16).to_be_bytes());
    hdr[8] = 64;
    hdr[9] = IPPROTO_ICMP;
    hdr[12..16].copy_from_slice(&src);
    hdr[16..20].copy_from_slice(&dst);
    let ip_csum = fold(sum16(&hdr[..IP_HLEN], 0));
    hdr[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    // ICMP: type, code, checksum, 4 unused bytes, then the quote; the sum
    // covers the ICMP message only (no pseudo header).
    let i = IP_HLEN;
    hdr[i] = ICMP_DEST_UNREACH;
    hdr[i + 1] = ICMP_PORT_UNREACH;
    hdr[i + ICMP_HLEN..].copy_from_slice(&quote);
    let icmp_csum = fold(sum16(&hdr[i..], 0));
    hdr[i + 2..i + 4].copy_from_slice(&icmp_csum.to_be_bytes());

    ctx.store(ETH_HLEN, &hdr, 0).map_err(|_| ())?;
    nat::bounce(ctx).map(Some)
}
