//! Attach/detach on a real veth pair inside a private network namespace.

mod common;

use std::collections::BTreeSet;

use catena_datapath::{AttachError, AttachMode, Datapath};
use common::{BpffsDir, Netns};

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: plain libc call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "{name} not found");
    i
}

fn link_pins(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn veth(ns: &Netns, host: &str, peer: &str) {
    ns.ip(&["link", "add", host, "type", "veth", "peer", "name", peer]);
    ns.ip(&["link", "set", host, "up"]);
    ns.ip(&["link", "set", peer, "up"]);
}

#[test]
fn tcx_attach_idempotent_detach_and_gc() {
    let ns = Netns::new();
    veth(&ns, "veth-h", "veth-p");
    veth(&ns, "veth-h2", "veth-p2");
    let dir = BpffsDir::new();
    let path = dir.path().to_path_buf();
    ns.run(move || {
        let mut dp = Datapath::open(&path).unwrap();
        let idx = ifindex("veth-h");
        assert_eq!(dp.attachment(idx).unwrap(), None);

        let t = std::time::Instant::now();
        assert_eq!(dp.attach(idx, "veth-h").unwrap(), AttachMode::Tcx);
        eprintln!("first TCX attach took {:?}", t.elapsed());
        assert_eq!(dp.attachment(idx).unwrap(), Some(AttachMode::Tcx));
        assert_eq!(
            link_pins(&path),
            [format!("{idx}-egress"), format!("{idx}-ingress")]
                .into_iter()
                .collect()
        );

        // Idempotent: same links (no second program in the TCX chain).
        let t = std::time::Instant::now();
        assert_eq!(dp.attach(idx, "veth-h").unwrap(), AttachMode::Tcx);
        eprintln!("idempotent re-attach took {:?}", t.elapsed());
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(
            "veth-h",
            aya::programs::TcAttachType::Ingress,
        )
        .unwrap();
        assert_eq!(progs.len(), 1, "re-attach added a second program");

        // A restarted agent (new program ids) upgrades the links in place.
        drop(dp);
        let mut dp = Datapath::open(&path).unwrap();
        assert_eq!(dp.attach(idx, "veth-h").unwrap(), AttachMode::Tcx);
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(
            "veth-h",
            aya::programs::TcAttachType::Ingress,
        )
        .unwrap();
        assert_eq!(progs.len(), 1);
        assert_eq!(progs[0].id(), dp.program_ids()["from_container"]);

        // Wrong ifindex for the name: refused.
        let err = dp.attach(idx + 1000, "veth-h").unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<AttachError>(),
                Some(AttachError::IfindexMismatch { .. })
            ),
            "{err:#}"
        );

        dp.detach(idx).unwrap();
        assert_eq!(dp.attachment(idx).unwrap(), None);
        assert!(link_pins(&path).is_empty());
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(
            "veth-h",
            aya::programs::TcAttachType::Egress,
        )
        .unwrap();
        assert!(progs.is_empty());
        // Detach again, and of an unknown interface: fine.
        dp.detach(idx).unwrap();
        dp.detach(999_999).unwrap();

        // GC: pins of deleted / not-live interfaces are collected.
        let idx2 = ifindex("veth-h2");
        dp.attach(idx, "veth-h").unwrap();
        dp.attach(idx2, "veth-h2").unwrap();
        assert_eq!(dp.gc_links(&[idx, idx2].into_iter().collect()).unwrap(), 0);
        assert_eq!(dp.gc_links(&[idx].into_iter().collect()).unwrap(), 2);
        assert_eq!(dp.attachment(idx2).unwrap(), None);
        assert_eq!(dp.attachment(idx).unwrap(), Some(AttachMode::Tcx));
        dp.detach(idx).unwrap();
    });
}

#[test]
fn deleted_interface_leaves_a_stale_pin_that_attach_and_gc_handle() {
    let ns = Netns::new();
    veth(&ns, "veth-h", "veth-p");
    let dir = BpffsDir::new();
    let path = dir.path().to_path_buf();
    let ns_name = ns.name.clone();
    ns.run(move || {
        let mut dp = Datapath::open(&path).unwrap();
        let idx = ifindex("veth-h");
        dp.attach(idx, "veth-h").unwrap();
        common::run("ip", &["-n", &ns_name, "link", "del", "veth-h"]);
        assert_eq!(dp.attachment(idx).unwrap(), None);
        // Pins still there but their links lost the device: collected even if
        // the caller still lists the ifindex as live.
        assert_eq!(dp.gc_links(&[idx].into_iter().collect()).unwrap(), 2);
        assert!(link_pins(&path).is_empty());
        dp.detach(idx).unwrap();
    });
}

#[test]
fn clsact_fallback_path() {
    let ns = Netns::new();
    veth(&ns, "veth-h", "veth-p");
    veth(&ns, "veth-q", "veth-r");
    // veth-q already has someone's clsact with a filter: kept as is.
    ns.tc(&["qdisc", "add", "dev", "veth-q", "clsact"]);
    ns.tc(&[
        "filter", "add", "dev", "veth-q", "ingress", "prio", "1", "u32", "match", "u32", "0", "0",
    ]);
    let dir = BpffsDir::new();
    let path = dir.path().to_path_buf();
    ns.run(move || {
        let mut dp = Datapath::open(&path).unwrap();
        let idx = ifindex("veth-h");
        let t = std::time::Instant::now();
        assert_eq!(
            dp.attach_with_mode(idx, "veth-h", AttachMode::Clsact)
                .unwrap(),
            AttachMode::Clsact
        );
        eprintln!("clsact attach took {:?}", t.elapsed());
        assert_eq!(dp.attachment(idx).unwrap(), Some(AttachMode::Clsact));
        assert!(link_pins(&path).is_empty(), "clsact leaves no link pins");
        // Idempotent, and the automatic mode sees the existing clsact filters?
        // It prefers TCX but must not double-attach via clsact.
        assert_eq!(
            dp.attach_with_mode(idx, "veth-h", AttachMode::Clsact)
                .unwrap(),
            AttachMode::Clsact
        );
        dp.detach(idx).unwrap();
        assert_eq!(dp.attachment(idx).unwrap(), None);

        let q = ifindex("veth-q");
        assert_eq!(
            dp.attach_with_mode(q, "veth-q", AttachMode::Clsact)
                .unwrap(),
            AttachMode::Clsact
        );
        assert_eq!(dp.attachment(q).unwrap(), Some(AttachMode::Clsact));
        dp.detach(q).unwrap();
        assert_eq!(dp.attachment(q).unwrap(), None);
    });
    // The foreign filter and qdisc survived attach and detach.
    let out = std::process::Command::new("tc")
        .args(["-n", &ns.name, "filter", "show", "dev", "veth-q", "ingress"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("u32"), "foreign filter removed: {out}");
    assert!(
        !out.contains("from_container"),
        "our filter left behind: {out}"
    );
}

#[test]
fn foreign_ingress_qdisc_is_never_replaced() {
    let ns = Netns::new();
    veth(&ns, "veth-h", "veth-p");
    ns.tc(&["qdisc", "add", "dev", "veth-h", "ingress"]);
    let dir = BpffsDir::new();
    let path = dir.path().to_path_buf();
    ns.run(move || {
        let mut dp = Datapath::open(&path).unwrap();
        let idx = ifindex("veth-h");
        let err = dp
            .attach_with_mode(idx, "veth-h", AttachMode::Clsact)
            .unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<AttachError>(),
                Some(AttachError::ForeignIngressQdisc { .. })
            ),
            "{err:#}"
        );
        // TCX attaches fine next to the ingress qdisc.
        assert_eq!(dp.attach(idx, "veth-h").unwrap(), AttachMode::Tcx);
        dp.detach(idx).unwrap();
    });
    let out = std::process::Command::new("tc")
        .args(["-n", &ns.name, "qdisc", "show", "dev", "veth-h"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("qdisc ingress"));
}

#[test]
fn failed_tcx_attach_leaves_nothing_attached() {
    let ns = Netns::new();
    veth(&ns, "veth-h", "veth-p");
    let dir = BpffsDir::new();
    let path = dir.path().to_path_buf();
    ns.run(move || {
        let mut dp = Datapath::open(&path).unwrap();
        let idx = ifindex("veth-h");
        // A directory where the egress link pin goes: the ingress link is
        // created and pinned first, then the egress side fails.
        let blocker = path.join("links").join(format!("{idx}-egress"));
        std::fs::create_dir(&blocker).unwrap();
        let err = dp.attach(idx, "veth-h").unwrap_err();
        assert!(format!("{err:#}").contains("egress"), "{err:#}");
        assert_eq!(dp.attachment(idx).unwrap(), None);
        for hook in [
            aya::programs::TcAttachType::Ingress,
            aya::programs::TcAttachType::Egress,
        ] {
            let (_, progs) = aya::programs::SchedClassifier::query_tcx("veth-h", hook).unwrap();
            assert!(progs.is_empty(), "{hook:?} left attached: {progs:?}");
        }
        std::fs::remove_dir(&blocker).unwrap();
        assert!(
            link_pins(&path).is_empty(),
            "the ingress pin was left behind"
        );
        // Nothing half-done blocks the next attempt.
        assert_eq!(dp.attach(idx, "veth-h").unwrap(), AttachMode::Tcx);
        dp.detach(idx).unwrap();
    });
}

#[test]
fn attacher_works_from_several_threads_at_once() {
    let ns = Netns::new();
    let names: Vec<String> = (0..4).map(|i| format!("veth-t{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        veth(&ns, n, &format!("veth-u{i}"));
    }
    let dir = BpffsDir::new();
    let path = dir.path().to_path_buf();
    let ns_path = format!("/run/netns/{}", ns.name);
    ns.run(move || {
        let dp = Datapath::open(&path).unwrap();
        let attacher = dp.attacher();
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let (attacher, name, ns_path) = (attacher.clone(), name.clone(), ns_path.clone());
                std::thread::spawn(move || {
                    use std::os::fd::AsRawFd;
                    let f = std::fs::File::open(&ns_path).unwrap();
                    // SAFETY: setns on a valid netns fd, this thread only.
                    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                    let idx = ifindex(&name);
                    (idx, attacher.attach(idx, &name, None).unwrap())
                })
            })
            .collect();
        let attached: Vec<(u32, AttachMode)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (idx, mode) in &attached {
            assert_eq!(*mode, AttachMode::Tcx);
            assert_eq!(dp.attachment(*idx).unwrap(), Some(AttachMode::Tcx));
        }
        assert_eq!(link_pins(&path).len(), 2 * attached.len());
        for (idx, _) in &attached {
            attacher.detach(*idx).unwrap();
            assert_eq!(dp.attachment(*idx).unwrap(), None);
        }
        assert!(link_pins(&path).is_empty());
    });
}
