//! The IPv6 packet as network policy sees it: addresses, the upper-layer
//! protocol behind any extension headers, ports (ICMPv6: the type as the
//! policy "port" and the echo identifier as the conntrack port, as ICMP in
//! `parse::parse`), and whether it is a non-first fragment. Service
//! translation reads packets with `parse::parse6`, which stops at the first
//! extension header; policy must judge every packet, so it walks them.

use aya_ebpf::programs::TcContext;
use catena_common::{IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

use crate::parse::ETH_HLEN;

const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (the packet is then invalid for
/// policy: judged fail-closed rather than by a guessed protocol).
const MAX_EXT_HEADERS: usize = 4;

const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_RST: u8 = 0x04;

const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Router solicitation .. redirect: neighbour discovery (RFC 4861).
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// Multicast listener query, report, done (MLDv1) and MLDv2 report.
const MLD_QUERY: u8 = 130;
const MLD_REPORT: u8 = 131;
const MLD_DONE: u8 = 132;
const MLD2_REPORT: u8 = 143;

/// The fixed IPv6 header, read in one helper call.
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

/// Addresses and ports in network order, as in the packet and the maps.
#[derive(Clone, Copy)]
pub struct PolicyFlow6 {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Conntrack ports: TCP/UDP/SCTP ports; for ICMPv6 echo the identifier
    /// (`sport` of a request, `dport` of a reply); 0 otherwise.
    pub sport: u16,
    pub dport: u16,
    /// The upper-layer protocol (after extension headers).
    pub proto: u8,
    /// TCP FIN or RST set.
    pub closing: bool,
    /// A non-first fragment: no L4 header, ports unknown (0).
    pub fragment: bool,
    /// What policy matches as the port (network order): the destination port
    /// of TCP/UDP/SCTP, `[0, type]` for ICMPv6.
    pub policy_port: u16,
    /// `policy_port` is meaningful; otherwise only protocol-level entries match.
    pub ports_known: bool,
    /// The link's own IPv6 plumbing: neighbour discovery, and multicast
    /// listener discovery with hop limit 1 (as RFC 2710/3810 send it; it can
    /// never leave the link). Always passes, like ARP for IPv4: every
    /// interface sends MLD reports when it comes up, and judging them would
    /// only fill the monitor with drops of traffic no policy can name.
    pub link_control: bool,
}

/// Reads an IPv6 packet (the caller has seen the EtherType). `Err`:
/// truncated, not version 6, or more extension headers than are walked.
#[inline(always)]
pub fn read(ctx: &TcContext) -> Result<PolicyFlow6, ()> {
    let ip: Ipv6Hdr = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if u32::from_be(ip.version_class_flow) >> 28 != 6 {
        return Err(());
    }
    let mut flow = PolicyFlow6 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: 0,
        dport: 0,
        proto: ip.next_header,
        closing: false,
        fragment: false,
        policy_port: 0,
        ports_known: false,
        link_control: false,
    };
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut walked = 0;
    loop {
        match flow.proto {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {}
            _ => break,
        }
        if walked == MAX_EXT_HEADERS {
            return Err(());
        }
        walked += 1;
        // next header, length, and (fragment header) the offset field.
        let head: [u8; 4] = ctx.load(off).map_err(|_| ())?;
        let len = match flow.proto {
            NEXTHDR_FRAGMENT => {
                let frag_off = u16::from_be_bytes([head[2], head[3]]) >> 3;
                flow.proto = head[0];
                if frag_off != 0 {
                    flow.fragment = true;
                    return Ok(flow);
                }
                8
            }
            // AH counts 4-byte units minus 2; the others 8-byte units minus 1.
            NEXTHDR_AUTH => (head[1] as usize + 2) * 4,
            _ => (head[1] as usize + 1) * 8,
        };
        flow.proto = head[0];
        off += len;
    }
    match flow.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            // Source and destination ports are the first 4 bytes of all three.
            let ports: [u16; 2] = ctx.load(off).map_err(|_| ())?;
            flow.sport = ports[0];
            flow.dport = ports[1];
            flow.policy_port = ports[1];
            flow.ports_known = true;
            if flow.proto == IPPROTO_TCP {
                let flags: u8 = ctx.load(off + 13).map_err(|_| ())?;
                flow.closing = flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0;
            }
        }
        IPPROTO_ICMPV6 => {
            // type, code, checksum, identifier (echo).
            let head: [u8; 6] = ctx.load(off).map_err(|_| ())?;
            let id = u16::from_ne_bytes([head[4], head[5]]);
            match head[0] {
                ICMPV6_ECHO_REQUEST => flow.sport = id,
                ICMPV6_ECHO_REPLY => flow.dport = id,
                t if (ND_FIRST..=ND_LAST).contains(&t) => flow.link_control = true,
                MLD_QUERY | MLD_REPORT | MLD_DONE | MLD2_REPORT if ip.hop_limit == 1 => {
                    flow.link_control = true
                }
                _ => {}
            }
            // In memory `[0, type]`: a 16-bit big-endian "port" equal to the type.
            flow.policy_port = u16::from_ne_bytes([0, head[0]]);
            flow.ports_known = true;
        }
        _ => {}
    }
    Ok(flow)
}
