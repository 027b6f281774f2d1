//! Header parsing. Reads go through `bpf_skb_load_bytes` (`ctx.load`), which
//! checks the offset against the packet length at run time: no direct packet
//! pointers, so no data/data_end proofs for the verifier, and non-linear skbs
//! (GRO/GSO) are read correctly without `bpf_skb_pull_data`.

use aya_ebpf::programs::TcContext;
use catena_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
/// EtherType offset in the Ethernet header.
const ETH_PROTO_OFF: usize = 12;
const ETH_P_IP: u16 = 0x0800;

/// Offsets of IPv4 fields from the start of the packet (Ethernet included).
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// Fragment offset bits of `frag_off` (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_RST: u8 = 0x04;

/// The fixed 20-byte IPv4 header, read in one helper call.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// An IPv4 TCP/UDP packet's tuple. Addresses and ports in network order, as in
/// the packet and in the maps.
#[derive(Clone, Copy)]
pub struct Flow4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Packet offset of the L4 header (Ethernet + IPv4 with options).
    pub l4_off: usize,
    /// TCP FIN or RST set.
    pub closing: bool,
}

impl Flow4 {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }

    #[inline(always)]
    pub fn is_udp(&self) -> bool {
        self.proto == IPPROTO_UDP
    }
}

pub enum Parsed {
    /// Not IPv4 TCP/UDP, or a non-first fragment (no L4 header): not ours.
    Other,
    Flow(Flow4),
}

/// Errors are truncated/malformed packets.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, ()> {
    let proto: u16 = ctx.load(ETH_PROTO_OFF).map_err(|_| ())?;
    if proto != ETH_P_IP.to_be() {
        // ARP, IPv6/ND, VLAN...: untouched.
        return Ok(Parsed::Other);
    }
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if ip.version_ihl >> 4 != 4 {
        return Err(());
    }
    let ihl = (ip.version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(());
    }
    if ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP {
        return Ok(Parsed::Other);
    }
    // Non-first fragments carry no L4 header; the first fragment (offset 0,
    // maybe MF set) carries the ports and is translated like any packet.
    if u16::from_be(ip.frag_off) & IP_OFFSET_MASK != 0 {
        return Ok(Parsed::Other);
    }
    let l4_off = ETH_HLEN + ihl * 4;
    // Source and destination ports are the first 4 bytes of TCP and UDP.
    let ports: [u16; 2] = ctx.load(l4_off).map_err(|_| ())?;
    let mut closing = false;
    if ip.protocol == IPPROTO_TCP {
        let flags: u8 = ctx.load(l4_off + 13).map_err(|_| ())?;
        closing = flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
    }
    Ok(Parsed::Flow(Flow4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports[0],
        dport: ports[1],
        proto: ip.protocol,
        l4_off,
        closing,
    }))
}
