//! Header parsing. Reads go straight to the skb's linear data when the
//! header lies inside it (one bounds check each, no helper call: on this
//! datapath a helper call costs more than the whole parse), and fall back to
//! `bpf_skb_load_bytes` (`ctx.load`) otherwise, so headers beyond the linear
//! area of a non-linear skb (GRO/GSO) are still read correctly without
//! `bpf_skb_pull_data`, which would reallocate the skb.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use catena_common::{IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

/// A `T` at `off` bytes into the packet: from the linear data when it lies
/// there, else through the load helper. `T` is plain data read unaligned
/// (headers sit at any offset).
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() <= end {
        // SAFETY: the bytes [start + off, start + off + size_of::<T>()) were
        // just checked to lie inside the linear packet data, which stays
        // valid for this program run (no helper that changes packet data is
        // called between the check and the read).
        return Ok(unsafe { ((start + off) as *const T).read_unaligned() });
    }
    ctx.load(off).map_err(|_| ())
}

pub const ETH_HLEN: usize = 14;
/// EtherType offset in the Ethernet header.
const ETH_PROTO_OFF: usize = 12;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// Offsets of IPv4 fields from the start of the packet (Ethernet included).
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// Fragment offset bits of `frag_off` (host order).
const IP_OFFSET_MASK: u16 = 0x1fff;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFF: usize = 13;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;

const IPPROTO_ICMPV6: u8 = 58;
/// Router solicitation .. redirect: neighbour discovery (RFC 4861).
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
const IPV6_HLEN: usize = 40;

/// The fixed 20-byte IPv4 header, read at once.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

/// Offsets of fields inside an IPv4 header.
pub const IPV4_CSUM: usize = 10;
pub const IPV4_DADDR: usize = 16;
pub const IPV4_HLEN: usize = 20;

/// An IPv4 packet's tuple. Addresses and ports in network order, as in the
/// packet and in the maps.
#[derive(Clone, Copy)]
pub struct Flow4 {
    pub saddr: u32,
    pub daddr: u32,
    /// Conntrack ports: TCP/UDP/SCTP ports; for ICMP echo the identifier
    /// (`sport` of a request, `dport` of a reply, so a reply reverses its
    /// request); 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Packet offset of the L4 header (Ethernet + IPv4 with options).
    pub l4_off: usize,
    /// TCP FIN or RST set.
    pub closing: bool,
    /// A TCP SYN without ACK: the first segment of a new connection.
    pub syn: bool,
    /// A non-first fragment: no L4 header, ports unknown (0).
    pub fragment: bool,
    /// What policy matches as the port (network order): the destination port
    /// of TCP/UDP/SCTP, `[0, type]` for ICMP.
    pub policy_port: u16,
    /// `policy_port` is meaningful (a port-carrying protocol or ICMP, and not
    /// a non-first fragment). Otherwise only protocol-level entries match.
    pub ports_known: bool,
}

impl Flow4 {
    /// Offset of the L4 checksum field (TCP/UDP).
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

    /// TCP or UDP with its L4 header: what services translate.
    #[inline(always)]
    pub fn is_tcp_udp(&self) -> bool {
        !self.fragment && (self.proto == IPPROTO_TCP || self.proto == IPPROTO_UDP)
    }
}

/// The start of a TCP header up to and including the flags byte.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    ports: [u16; 2],
    seq: u32,
    ack: u32,
    data_off: u8,
    flags: u8,
}

const _: () = assert!(core::mem::offset_of!(TcpHead, flags) == TCP_FLAGS_OFF);

pub enum Packet {
    /// Neither IPv4 nor IPv6 (ARP, VLAN, LLDP...): never touched.
    Other,
    /// IPv6: catena is IPv4-only; see `is_ipv6_nd`.
    Ipv6,
    Ipv4(Flow4),
}

/// Errors are truncated/malformed IPv4 packets.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, ()> {
    let proto: u16 = read(ctx, ETH_PROTO_OFF)?;
    if proto != ETH_P_IP.to_be() {
        if proto == ETH_P_IPV6.to_be() {
            return Ok(Packet::Ipv6);
        }
        return Ok(Packet::Other);
    }
    let ip: Ipv4Hdr = read(ctx, ETH_HLEN)?;
    if ip.version_ihl >> 4 != 4 {
        return Err(());
    }
    let ihl = (ip.version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(());
    }
    // Options are skipped, never parsed: the L4 header starts at IHL * 4.
    let l4_off = ETH_HLEN + ihl * 4;
    let mut flow = Flow4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: ip.protocol,
        l4_off,
        closing: false,
        syn: false,
        fragment: false,
        policy_port: 0,
        ports_known: false,
    };
    // Non-first fragments carry no L4 header; the first fragment (offset 0,
    // maybe MF set) carries the ports and is handled like any packet.
    if u16::from_be(ip.frag_off) & IP_OFFSET_MASK != 0 {
        flow.fragment = true;
        return Ok(Packet::Ipv4(flow));
    }
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            // Source and destination ports are the first 4 bytes of all three.
            if ip.protocol == IPPROTO_TCP {
                // Ports and flags in one read: the first 14 bytes.
                let head: TcpHead = read(ctx, l4_off)?;
                flow.sport = head.ports[0];
                flow.dport = head.ports[1];
                flow.closing = head.flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
                flow.syn = head.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
            } else {
                // Source and destination ports are the first 4 bytes of all three.
                let ports: [u16; 2] = read(ctx, l4_off)?;
                flow.sport = ports[0];
                flow.dport = ports[1];
            }
            flow.policy_port = flow.dport;
            flow.ports_known = true;
        }
        IPPROTO_ICMP => {
            // type, code, checksum, identifier (echo).
            let head: [u8; 6] = read(ctx, l4_off)?;
            let id = u16::from_ne_bytes([head[4], head[5]]);
            match head[0] {
                ICMP_ECHO => flow.sport = id,
                ICMP_ECHO_REPLY => flow.dport = id,
                _ => {}
            }
            // In memory `[0, type]`: a 16-bit big-endian "port" equal to the type.
            flow.policy_port = u16::from_ne_bytes([0, head[0]]);
            flow.ports_known = true;
        }
        _ => {}
    }
    Ok(Packet::Ipv4(flow))
}

/// An IPv6 neighbour-discovery message (ICMPv6 133..=137 right after the
/// fixed header, as ND is sent): always let through, like ARP, so an
/// interface's link-local plumbing keeps working.
#[inline(always)]
pub fn is_ipv6_nd(ctx: &TcContext) -> bool {
    let Ok(next) = read::<u8>(ctx, ETH_HLEN + 6) else {
        return false;
    };
    if next != IPPROTO_ICMPV6 {
        return false;
    }
    matches!(read::<u8>(ctx, ETH_HLEN + IPV6_HLEN), Ok(t) if (ND_FIRST..=ND_LAST).contains(&t))
}

/// The fixed 40-byte IPv6 header, read at once.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    version_class_flow: u32,
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
}

/// Packet offsets of IPv6 fields (Ethernet included).
pub const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
pub const IP6_DADDR_OFF: usize = ETH_HLEN + 24;
/// Where the L4 header starts when no extension header precedes it.
pub const IP6_L4_OFF: usize = ETH_HLEN + IPV6_HLEN;

/// An IPv6 TCP/UDP/SCTP packet's tuple, for service translation. Addresses
/// and ports in network order, as in the packet and in the maps.
#[derive(Clone, Copy)]
pub struct Flow6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP FIN or RST set.
    pub closing: bool,
    /// A TCP SYN without ACK: the first segment of a new connection.
    pub syn: bool,
    /// The IPv6 payload length (host order): what the L4 header and data
    /// span.
    pub payload_len: u16,
}

impl Flow6 {
    pub const L4_OFF: usize = IP6_L4_OFF;

    /// Offset of the L4 checksum field (TCP/UDP).
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        if self.proto == IPPROTO_TCP {
            Self::L4_OFF + 16
        } else {
            Self::L4_OFF + 6
        }
    }

    #[inline(always)]
    pub fn is_udp(&self) -> bool {
        self.proto == IPPROTO_UDP
    }
}

/// Parses an IPv6 packet (the caller has seen the EtherType). `Ok(None)`:
/// not a TCP/UDP packet whose L4 header follows the fixed header directly
/// (ICMPv6, extension headers, fragments), which service translation leaves
/// alone. `Err`: truncated or not version 6.
#[inline(always)]
pub fn parse6(ctx: &TcContext) -> Result<Option<Flow6>, ()> {
    let ip: Ipv6Hdr = read(ctx, ETH_HLEN)?;
    if u32::from_be(ip.version_class_flow) >> 28 != 6 {
        return Err(());
    }
    if ip.next_header != IPPROTO_TCP && ip.next_header != IPPROTO_UDP {
        return Ok(None);
    }
    let (ports, flags) = if ip.next_header == IPPROTO_TCP {
        let head: TcpHead = read(ctx, IP6_L4_OFF)?;
        (head.ports, head.flags)
    } else {
        (read::<[u16; 2]>(ctx, IP6_L4_OFF)?, 0)
    };
    Ok(Some(Flow6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: ports[0],
        dport: ports[1],
        proto: ip.next_header,
        closing: flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0,
        syn: flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN,
        payload_len: u16::from_be(ip.payload_len),
    }))
}
