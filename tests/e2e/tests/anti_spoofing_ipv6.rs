//! IPv6 anti-spoofing end to end: dual-stack pods wired by the real ptp +
//! host-local primary and the real `catena-cni`, the real agent. A pod
//! sending from an IPv6 address that is not its own (another address of its
//! subnet, or one from nowhere) is dropped at its host veth and counted, and
//! the drop shows in `catena monitor` with the forged source; its own
//! address, neighbour discovery (after every neighbour is forgotten),
//! link-local traffic and duplicate address detection (from `::`) keep
//! working.

use anyhow::Context;
use catena_e2e::dual_stack::{conflist, no_dad, pod_gateway6, pod_ipv6};
use catena_e2e::monitor::DropMonitor;
use catena_e2e::{pod_yaml, write_manifest};
use catena_lab::{CallArgs, CniRunner, Netns, Node, Pod};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

const PORT: u16 = 7070;

/// A UDP socket on `[::]:port` inside `ns` (it stays in that namespace).
fn listen(ns: &Netns, port: u16) -> anyhow::Result<UdpSocket> {
    let s = ns.enter_thread(move || UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)))??;
    s.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(s)
}

/// Sends `payload` from `ns`, bound to `from`, to `to`; returns the socket
/// (for a reply).
fn send(ns: &Netns, from: Ipv6Addr, to: SocketAddr, payload: &str) -> anyhow::Result<UdpSocket> {
    let payload = payload.to_string();
    let s = ns.enter_thread(move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((from, 0))?;
        s.send_to(payload.as_bytes(), to)?;
        Ok(s)
    })??;
    Ok(s)
}

/// Datagrams `rx` receives until one reads `until` (included), or `within`
/// passes (then `until` is not among them).
fn receive_until(rx: &UdpSocket, until: &str, within: Duration) -> Vec<(String, SocketAddr)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if let Ok((n, from)) = rx.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text == until;
            got.push((text, from));
            if done {
                break;
            }
        }
    }
    got
}

/// Sends from the pod's own address until the server hears it (routes and
/// neighbours settling), at most 10 s.
fn own_address_reaches(
    client: &Pod,
    own: Ipv6Addr,
    rx: &UdpSocket,
    to: SocketAddr,
    tag: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        let payload = format!("{tag}-{i}");
        send(client.netns(), own, to, &payload)?;
        let got = receive_until(rx, &payload, Duration::from_millis(300));
        if got
            .iter()
            .any(|(p, from)| *p == payload && from.ip() == IpAddr::V6(own))
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{tag}: the pod's own address {own} never reached {to}"
        );
    }
    unreachable!()
}

fn spoofed_drops(api: &catena_api::Client) -> anyhow::Result<u64> {
    let status: catena_api::Status = api.get("/v1/status")?;
    Ok(status.datapath.counters["drop_spoofed_source"])
}

/// The address of `dev` in `ns` in scope link (its fe80:: address).
fn link_local(ns: &Netns, dev: &str) -> anyhow::Result<Ipv6Addr> {
    let out = ns.run(
        "ip",
        &["-6", "-o", "addr", "show", "dev", dev, "scope", "link"],
    )?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .with_context(|| format!("no link-local address on {dev}: {out}"))
}

fn ifindex(ns: &Netns, dev: &str) -> anyhow::Result<u32> {
    ns.links_json()?
        .iter()
        .find(|l| l["ifname"] == dev)
        .and_then(|l| l["ifindex"].as_u64())
        .map(|i| i as u32)
        .with_context(|| format!("no {dev}"))
}

#[test]
fn spoofed_ipv6_sources_are_dropped_while_own_address_and_nd_work() -> anyhow::Result<()> {
    let node = Node::new("e2e-spoof6")?;
    no_dad(node.netns())?;
    let manifests = node.dir().join("manifests");
    write_manifest(
        &manifests,
        "pods.yaml",
        &[pod_yaml("client", "client"), pod_yaml("server", "server")].join("---\n"),
    )?;
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let cni = CniRunner::new(&node, conflist(&node, "e2e-spoof6", 18)?);
    let client = node.pod("client")?;
    let server = node.pod("server")?;
    for pod in [&client, &server] {
        no_dad(pod.netns())?;
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let own = pod_ipv6(&client)?;
    let to = SocketAddr::from((pod_ipv6(&server)?, PORT));
    let rx = listen(server.netns(), PORT)?;

    // The pod's own address works.
    own_address_reaches(&client, own, &rx, to, "own")?;

    // Another address of the pod's subnet, and one from nowhere, configured
    // on the pod's interface so its stack sends from them: dropped.
    let same_subnet: Ipv6Addr = "fd00:10:244:18::250".parse()?;
    let elsewhere: Ipv6Addr = "fd00:99::7".parse()?;
    for a in [same_subnet, elsewhere] {
        client.netns().run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
    }
    let before = spoofed_drops(&api)?;
    for a in [same_subnet, elsewhere] {
        for i in 0..3 {
            send(client.netns(), a, to, &format!("spoofed-{a}-{i}"))?;
        }
    }
    // Sent after them on the same path: once it is in, so would they be.
    send(client.netns(), own, to, "own-after")?;
    let got = receive_until(&rx, "own-after", Duration::from_secs(3));
    assert!(
        got.iter().any(|(p, _)| p == "own-after"),
        "the own address stopped working: {got:?}"
    );
    let leaked: Vec<_> = got
        .iter()
        .filter(|(p, _)| p.starts_with("spoofed"))
        .collect();
    assert!(
        leaked.is_empty(),
        "spoofed datagrams reached the server: {leaked:?}"
    );
    let dropped = spoofed_drops(&api)? - before;
    // The kernel may also have solicited a neighbour from a forged source
    // (dropped and counted the same way).
    assert!(
        dropped >= 6,
        "drop_spoofed_source rose by {dropped}, want >= 6"
    );

    // `catena monitor` shows the drop with the forged source.
    let mon = DropMonitor::start(&node, "spoofed_source")?;
    std::thread::sleep(Duration::from_millis(500)); // let it subscribe
    send(client.netns(), elsewhere, to, "spoofed-watched")?;
    let ev = mon.event()?;
    assert_eq!(ev["direction"], "egress", "{ev}");
    assert_eq!(ev["proto"], "UDP", "{ev}");
    let src: SocketAddr = ev["src"].as_str().unwrap_or_default().parse()?;
    assert_eq!(src.ip(), IpAddr::V6(elsewhere), "{ev}");
    assert_eq!(ev["dst"], to.to_string(), "{ev}");

    // Neighbour discovery: with every neighbour forgotten on both sides,
    // the own address still gets through (solicitations and advertisements
    // of the pod pass).
    client.netns().run("ip", &["-6", "neigh", "flush", "all"])?;
    node.netns().run("ip", &["-6", "neigh", "flush", "all"])?;
    own_address_reaches(&client, own, &rx, to, "after-flush")?;

    // Link-local: the pod to its host veth's fe80:: address and back.
    let host = client.host_veth(&node, "eth0")?;
    let host_ll = link_local(node.netns(), &host)?;
    let node_rx = listen(node.netns(), PORT)?;
    let scope = ifindex(client.netns(), "eth0")?;
    let client_ll = link_local(client.netns(), "eth0")?;
    let to_host = SocketAddr::V6(SocketAddrV6::new(host_ll, PORT, 0, scope));
    let deadline = Instant::now() + Duration::from_secs(5);
    let (sock, from) = loop {
        let sock = send(client.netns(), Ipv6Addr::UNSPECIFIED, to_host, "ll")?;
        if let Some((_, from)) = receive_until(&node_rx, "ll", Duration::from_millis(300))
            .into_iter()
            .find(|(p, _)| p == "ll")
        {
            break (sock, from);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "link-local {to_host} not reached"
        );
    };
    assert_eq!(from.ip(), IpAddr::V6(client_ll), "link-local source");
    node_rx.send_to(b"ll-reply", from)?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf).context("link-local reply")?;
    assert_eq!(&buf[..n], b"ll-reply");

    // Duplicate address detection (solicitations from ::): the pod claims
    // its gateway's address, which the host side holds, with DAD on; the
    // host's answer makes it fail. Were `::` dropped, nobody would object
    // and the address would become valid.
    let gateway = pod_gateway6(&client)?;
    client
        .netns()
        .run("sysctl", &["-q", "-w", "net.ipv6.conf.eth0.accept_dad=1"])?;
    client.netns().run(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{gateway}/128"),
            "dev",
            "eth0",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let out = client
            .netns()
            .run("ip", &["-6", "addr", "show", "dev", "eth0"])?;
        let line = out.lines().find(|l| l.contains(&format!("{gateway}/128")));
        if line.is_some_and(|l| l.contains("dadfailed")) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline && line.is_some_and(|l| l.contains("tentative")),
            "DAD of {gateway} did not fail (its solicitation from :: never got through): {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    client.netns().run(
        "ip",
        &[
            "-6",
            "addr",
            "del",
            &format!("{gateway}/128"),
            "dev",
            "eth0",
        ],
    )?;

    for pod in [&client, &server] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    drop(agent);
    Ok(())
}
