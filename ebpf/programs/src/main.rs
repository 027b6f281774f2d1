//! catena's kernel-side programs. Two tc classifiers share one set of maps:
//! - `from_container` (host-veth ingress: packets the pod sends): service DNAT;
//! - `to_container` (host-veth egress: packets delivered to the pod): reverse NAT
//!   of replies from service backends;
//!
//! and both enforce network policy (egress resp. ingress) with conntrack so
//! replies of allowed connections pass.
//!
//! Two more classifiers sit on the node's external devices:
//! - `from_netdev` (ingress): NodePort / externalIP / LoadBalancer frontends
//!   reached from outside, and replies of flows SNATed to remote backends;
//! - `to_netdev` (egress): replies of local backends to external clients.
//!
//! Four cgroup sock_addr programs (`sock.rs`) do the same load balancing at
//! the socket level for processes of a cgroup (the node's own processes).
//!
//! Layout follows Cilium's bpf/: one file per attach point, logic split by
//! concern, every map declared once in `maps.rs`.
#![no_std]
#![no_main]

mod affinity;
mod ct;
mod ct6;
mod endpoint;
mod events;
mod flow6;
mod icmp_error;
mod from_container;
mod from_netdev;
mod lb;
mod lb6;
mod maglev;
mod maps;
mod metrics;
mod nat;
mod nat6;
mod netdev6;
mod node_addr;
mod nodeport;
mod nodeport6;
mod parse;
mod policy;
mod policy6;
mod reject;
mod reject6;
mod service6;
mod sock;
mod sock6;
mod to_container;
mod to_netdev;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Verdict for "not ours / done": `TC_ACT_UNSPEC`. With TCX it means
/// `TCX_NEXT` and with a clsact filter chain "continue": programs attached after
/// us (another chained plugin) still run, and if there are none the packet is
/// passed exactly as with `TC_ACT_OK`. Returning `TC_ACT_OK` would end the
/// chain and silently bypass them.
pub const VERDICT_PASS: i32 = aya_ebpf::bindings::TC_ACT_UNSPEC;
pub const VERDICT_DROP: i32 = aya_ebpf::bindings::TC_ACT_SHOT;

/// An empty classifier: the baseline of per-packet cost measurements
/// (BPF_PROG_TEST_RUN). Loaded, never attached.
#[classifier]
pub fn noop(_ctx: TcContext) -> i32 {
    VERDICT_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable loop, and panics cannot unwind in BPF;
    // this is never reached in a verified program.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
