//! The operator's view of a real agent: every `catena` command in table and
//! JSON form, `catena monitor` streaming a real drop, the error when the
//! agent is down, the Prometheus endpoint (counters move with traffic), and
//! the conntrack GC expiring idle flows while keeping an open one.

use catena_api::{CtEntry, Endpoint, ServiceStatus};
use catena_e2e::dual_stack::{self, no_dad, pod_ipv6};
use catena_e2e::monitor::DropMonitor;
use catena_e2e::source::{ClusterSource, SourceKind};
use catena_e2e::{pod_yaml, wait_for};
use catena_lab::traffic::serve_udp_on;
use catena_lab::{bin_path, count_backends, CallArgs, CniRunner, Node};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.50";

fn vip() -> SocketAddr {
    format!("{VIP}:80").parse().unwrap()
}

/// Runs `catena --socket S ARGS..` (the CLI needs no network namespace: it
/// only speaks to the socket).
fn catena(node: &Node, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(bin_path("catena")?)
        .arg("--socket")
        .arg(node.agent_socket())
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// stdout of a command that must succeed.
fn ok(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    let o = catena(node, args)?;
    anyhow::ensure!(
        o.status.success(),
        "catena {args:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8(o.stdout)?)
}

fn json(node: &Node, args: &[&str]) -> anyhow::Result<Value> {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    let out = ok(node, &full)?;
    serde_json::from_str(&out).map_err(|e| anyhow::anyhow!("catena {args:?} -o json: {e}: {out}"))
}

/// Parses Prometheus text: `name{labels}` -> value (HELP/TYPE lines checked
/// for form, every sample must parse).
fn parse_metrics(text: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.is_empty() {
            continue;
        }
        anyhow::ensure!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow::anyhow!("bad sample {line:?}"))?;
        let v: f64 = value
            .parse()
            .map_err(|_| anyhow::anyhow!("bad value in {line:?}"))?;
        anyhow::ensure!(
            out.insert(series.to_string(), v).is_none(),
            "duplicate {series}"
        );
    }
    Ok(out)
}

/// `GET /metrics` on the agent's Prometheus address, from inside the node's
/// network namespace (where the agent listens).
fn scrape(node: &Node, addr: &'static str) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = node
        .netns()
        .enter_thread(move || -> anyhow::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut raw = String::new();
            s.read_to_string(&mut raw)?;
            let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_default();
            anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
            anyhow::ensure!(
                head.to_lowercase()
                    .contains("content-type: text/plain; version=0.0.4"),
                "{head}"
            );
            Ok(body.to_string())
        })??;
    parse_metrics(&text)
}

fn metric(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or_default()
}

#[test]
fn cli_metrics_monitor_and_conntrack_gc() -> anyhow::Result<()> {
    let node = Node::new("ops-cli")?;
    let source = ClusterSource::new(SourceKind::Manifests, &node)?;
    // TCP and UDP on the same port, and a port whose server holds
    // connections open: three frontends.
    source.apply(
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: web}}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}\n  - {{name: hold, port: 81, targetPort: 8081, protocol: TCP}}\n"
        ),
    )?;
    source.apply("pods.yaml", &pod_yaml("web-1", "web"))?;
    let mut agent = source.start_agent(
        &node,
        &[
            "--prometheus-bind-address",
            "127.0.0.1:9962",
            "--ct-gc-interval",
            "1s",
            "--ct-tcp-closing-timeout",
            "2s",
            "--ct-any-timeout",
            "2s",
        ],
    )?;
    let conf = node.ptp_conflist("ops", "10.244.50.0/24", "1.0.0", vec![node.catena_plugin()])?;
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let web = node.pod("web-1")?;
    cni.add(&client, "eth0", &CallArgs::default())?;
    cni.add(&web, "eth0", &CallArgs::default())?;
    let _srv = web.serve_tcp(8080, "web-1")?;
    let _udp = web.serve_udp(8080, "web-1-udp")?;
    // Accepts connections and keeps them open, silent, until the test ends.
    let holder = web
        .netns()
        .enter_thread(|| std::net::TcpListener::bind("0.0.0.0:8081"))??;
    let held = std::thread::spawn(move || holder.accept().map(|(conn, _)| conn));

    let before = scrape(&node, "127.0.0.1:9962")?;
    let counts = count_backends(&client, vip(), 20)?;
    assert_eq!(counts.get("web-1"), Some(&20), "{counts:?}");
    let after = scrape(&node, "127.0.0.1:9962")?;
    // Counters move with traffic.
    let dnat = r#"catena_services_translated_total{kind="dnat"}"#;
    assert!(
        metric(&after, dnat) >= metric(&before, dnat) + 20.0,
        "{dnat}: {before:?} -> {after:?}"
    );
    let pkts = r#"catena_datapath_packets_total{direction="egress"}"#;
    assert!(
        metric(&after, pkts) >= metric(&before, pkts) + 60.0,
        "{pkts}"
    );
    let rev = r#"catena_services_translated_total{kind="reverse_nat"}"#;
    assert!(metric(&after, rev) > metric(&before, rev), "{rev}");
    // The CNI ADDs were counted and timed; the endpoint adds and the first
    // sync were timed to the maps written.
    assert_eq!(
        metric(
            &after,
            r#"catena_cni_requests_total{route="put_endpoint",code="200"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &after,
            r#"catena_cni_request_duration_seconds_count{route="put_endpoint"}"#
        ),
        2.0
    );
    assert!(
        metric(
            &after,
            r#"catena_service_implementation_delay_seconds_count{trigger="endpoint"}"#
        ) >= 2.0
    );
    assert!(
        metric(
            &after,
            r#"catena_service_implementation_delay_seconds_count{trigger="source"}"#
        ) >= 1.0
    );
    assert!(
        metric(
            &after,
            r#"catena_policy_implementation_delay_seconds_count{trigger="endpoint"}"#
        ) >= 2.0
    );
    assert_eq!(metric(&after, "catena_endpoints"), 2.0);
    assert_eq!(metric(&after, "catena_services"), 3.0);
    assert_eq!(metric(&after, "catena_agent_ready"), 1.0);
    assert!(metric(&after, r#"catena_bpf_map_entries{map_name="LB4_SERVICES"}"#) >= 2.0);
    assert_eq!(
        metric(&after, r#"catena_bpf_map_capacity{map_name="CT4"}"#),
        262144.0
    );
    assert!(metric(&after, "catena_conntrack_entries") >= 1.0);
    // The same text on the agent socket.
    let on_socket = agent.client().request("GET", "/metrics", None)?;
    assert!(String::from_utf8(on_socket)?.contains("catena_services_translated_total"));

    // status: tables and JSON.
    let status = ok(&node, &["status"])?;
    for want in [
        "Ready",
        "Programs:",
        "from_container",
        "to_container",
        "Attach:      tcx: 2",
        "CT4",
        "Health:",
        "Not supported:",
    ] {
        assert!(status.contains(want), "status lacks {want:?}:\n{status}");
    }
    assert!(!status.contains("FAIL"), "{status}");
    let s = json(&node, &["status"])?;
    assert_eq!(s["ready"], true);
    assert_eq!(s["endpoints"], 2);
    let detail = &s["detail"];
    let programs = detail["programs"].as_array().unwrap();
    assert!(
        programs
            .iter()
            .any(|p| p["name"] == "from_container" && p["tag"].as_str().unwrap().len() == 16),
        "{programs:?}"
    );
    assert_eq!(detail["links"].as_array().unwrap().len(), 4, "{detail}");
    assert!(
        detail["health"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["ok"] == true),
        "{detail}"
    );

    // endpoint list/get, service list.
    let eps: Vec<Endpoint> = serde_json::from_value(json(&node, &["endpoint", "list"])?)?;
    assert_eq!(eps.len(), 2);
    let table = ok(&node, &["endpoint", "list"])?;
    assert!(
        table.starts_with("ID ") && table.contains("default/client"),
        "{table}"
    );
    let one = json(&node, &["endpoint", "get", &client.container_id[..12]])?;
    assert_eq!(one["spec"]["containerId"], client.container_id.as_str());
    let svcs: Vec<ServiceStatus> = serde_json::from_value(json(&node, &["service", "list"])?)?;
    assert!(
        svcs.iter().any(|s| s.frontend == format!("{VIP}:80/UDP")),
        "{svcs:?}"
    );
    assert!(ok(&node, &["service", "list"])?.contains("default/web"));

    // ct list: the flows just made, with their backend and reverse NAT.
    let ct: Vec<CtEntry> = serde_json::from_value(json(&node, &["ct", "list"])?)?;
    let web_ip = web.ipv4()?;
    assert!(
        ct.iter().any(|e| e.kind == "service"
            && e.dst == format!("{VIP}:80")
            && e.backend == Some(format!("{web_ip}:8080"))),
        "{ct:?}"
    );
    assert!(
        ct.iter()
            .any(|e| e.kind == "egress" && e.rev_nat == Some(format!("{VIP}:80")) && e.packets > 0),
        "{ct:?}"
    );
    let table = ok(&node, &["ct", "list"])?;
    assert!(
        table.starts_with("KIND ") && table.contains("closing"),
        "{table}"
    );

    // bpf dumps.
    let lb = json(&node, &["bpf", "lb", "list"])?;
    let entries = lb["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["backend"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{web_ip}:8080"))),
        "{lb}"
    );
    assert!(ok(&node, &["bpf", "lb", "list"])?.contains("LB4_BACKENDS: 3 / 524288 entries"));
    let bct = json(&node, &["bpf", "ct", "list"])?;
    assert!(!bct["entries"].as_array().unwrap().is_empty());
    let bep = json(&node, &["bpf", "endpoint", "list"])?;
    let ips: Vec<&str> = bep["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ipv4"].as_str().unwrap())
        .collect();
    assert!(ips.contains(&web_ip.to_string().as_str()), "{bep}");
    assert!(ok(&node, &["bpf", "endpoint", "list"])?.starts_with("IFINDEX "));
    // The ipcache knows every pod address; no policy selects anything here.
    let ipc = json(&node, &["bpf", "ipcache", "list"])?;
    let prefixes: Vec<&str> = ipc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["prefix"].as_str().unwrap())
        .collect();
    assert!(prefixes.contains(&format!("{web_ip}/32").as_str()), "{ipc}");
    assert!(ok(&node, &["bpf", "ipcache", "list"])?.starts_with("PREFIX "));
    assert!(ok(&node, &["bpf", "policy", "list"])?.starts_with("ENDPOINT "));

    // Conntrack GC: an open TCP connection stays; the finished ones and an
    // idle UDP flow expire (closing/any timeouts 2 s, GC every 1 s).
    let hold_addr: SocketAddr = format!("{VIP}:81").parse()?;
    let open = client
        .netns()
        .enter_thread(move || TcpStream::connect_timeout(&hold_addr, Duration::from_secs(3)))??;
    let open_port = open.local_addr()?.port();
    client.udp_request(vip(), Duration::from_secs(2))?;
    let gc = wait_for("idle flows collected", Duration::from_secs(15), || {
        let ct: Vec<CtEntry> = agent.client().get("/v1/ct")?;
        let others = ct
            .iter()
            .filter(|e| !e.src.ends_with(&format!(":{open_port}")))
            .count();
        Ok((others == 0).then_some(ct))
    })?;
    assert_eq!(
        gc.len(),
        2,
        "the open connection keeps both entries: {gc:?}"
    );
    let m = scrape(&node, "127.0.0.1:9962")?;
    assert!(
        metric(&m, "catena_conntrack_gc_entries_removed_total") >= 40.0,
        "{m:?}"
    );
    assert!(metric(&m, "catena_conntrack_gc_runs_total") >= 1.0);
    drop(open);
    drop(held.join().expect("holder thread")?);

    // ct flush.
    let flushed = json(&node, &["ct", "flush"])?;
    assert!(flushed["removed"].as_u64().unwrap() >= 1, "{flushed}");
    assert!(agent.client().get::<Vec<CtEntry>>("/v1/ct")?.is_empty());

    // monitor: a spoofed source from the client pod is dropped and shown.
    let events = detail["events"].as_str().unwrap().to_string();
    let mon = DropMonitor::start(&node, "spoofed_source")?;
    if events == "available" {
        std::thread::sleep(Duration::from_millis(500)); // let it subscribe
        client
            .netns()
            .run("ip", &["addr", "add", "10.244.50.250/32", "dev", "eth0"])?;
        let started = Instant::now();
        client
            .netns()
            .enter_thread(move || -> std::io::Result<()> {
                let s = std::net::UdpSocket::bind("10.244.50.250:0")?;
                // A few, in case the first leaves before the monitor subscribed.
                for _ in 0..20 {
                    s.send_to(b"spoof", vip())?;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            })??;
        let ev = mon.event()?;
        assert_eq!(
            (ev["kind"].as_str(), ev["reason"].as_str()),
            (Some("drop"), Some("spoofed_source")),
            "{ev}"
        );
        assert_eq!(
            ev["src"].as_str().unwrap().split(':').next(),
            Some("10.244.50.250")
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        let m = scrape(&node, "127.0.0.1:9962")?;
        assert!(
            metric(
                &m,
                r#"catena_datapath_events_total{kind="drop",reason="spoofed_source",direction="egress"}"#
            ) >= 1.0,
            "{m:?}"
        );
    } else {
        // The datapath has no event reader: the agent says so with a 503.
        let out = mon.output()?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("503") && err.contains("events not available"),
            "{err}"
        );
    }
    // A bad filter is refused by the agent, whatever the datapath.
    let err = agent
        .client()
        .stream("/v1/monitor?type=bogus")
        .err()
        .expect("type=bogus refused");
    assert_eq!(err.status(), Some(400), "{err}");
    println!("monitor: {events}");

    // health
    assert_eq!(ok(&node, &["health"])?.trim(), "alive");
    assert_eq!(ok(&node, &["health", "--ready"])?.trim(), "ready");
    assert_eq!(json(&node, &["health", "--ready"])?["ready"], true);

    // Every command with the agent down: a clear error, exit 1.
    agent.stop()?;
    for args in [
        vec!["status"],
        vec!["endpoint", "list"],
        vec!["service", "list", "-o", "json"],
        vec!["ct", "list"],
        vec!["bpf", "lb", "list"],
        vec!["monitor", "--count", "1"],
        vec!["health"],
    ] {
        let o = catena(&node, &args)?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("the catena agent is not running"),
            "{args:?}: {err}"
        );
    }
    agent.start_again()?;
    for pod in [&client, &web] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}

/// IPv6 conntrack is listed (`ct list`, `bpf ct list`, with `-o json`),
/// shown next to the IPv6 service maps (`bpf lb list`), collected by the
/// periodic GC like IPv4 (idle flows go, an open connection keeps both its
/// entries) and flushed.
#[test]
fn ipv6_conntrack_listed_collected_and_flushed() -> anyhow::Result<()> {
    const VIP6: &str = "fd00:96::60";
    let node = Node::new("ops-ct6")?;
    no_dad(node.netns())?;
    let manifests = node.dir().join("manifests");
    catena_e2e::write_manifest(
        &manifests,
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web6, namespace: default}}\nspec:\n  clusterIP: 10.96.0.60\n  clusterIPs: [10.96.0.60, \"{VIP6}\"]\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n  selector: {{app: web}}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 53, targetPort: 5353, protocol: UDP}}\n  - {{name: hold, port: 81, targetPort: 8081, protocol: TCP}}\n---\n{}",
            pod_yaml("web-1", "web")
        ),
    )?;
    let agent = node.start_agent(
        &manifests,
        &[
            "--ct-gc-interval",
            "1s",
            "--ct-tcp-closing-timeout",
            "3s",
            "--ct-any-timeout",
            "3s",
        ],
    )?;
    let cni = CniRunner::new(&node, dual_stack::conflist(&node, "ops-dual", 51)?);
    let client = node.pod("client")?;
    let web = node.pod("web-1")?;
    for pod in [&client, &web] {
        no_dad(pod.netns())?;
        cni.add(pod, "eth0", &CallArgs::default())?;
    }
    let web_ip = pod_ipv6(&web)?;
    let mut tcp_server = Command::new("socat");
    tcp_server.args(["TCP6-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo web-1"]);
    let mut tcp_server = web.netns().spawn(tcp_server)?;
    // One socket, not socat's forking UDP server, whose child can die on
    // EPIPE without answering (see `serve_udp_on`).
    let udp_server = serve_udp_on(web.netns(), Ipv6Addr::UNSPECIFIED.into(), 5353, "web-1")?;
    // Answers one line on one held connection, when asked.
    let holder = web
        .netns()
        .enter_thread(|| std::net::TcpListener::bind("[::]:8081"))??;
    let held = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = holder.accept()?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf)?;
        conn.write_all(b"pong\n")
    });
    let tcp = |addr: SocketAddr| -> anyhow::Result<String> {
        client
            .netns()
            .enter_thread(move || -> anyhow::Result<String> {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out.trim().to_string())
            })?
    };
    // Direct IPv6 first: routes are up and the server listens.
    let direct = SocketAddr::from((web_ip, 8080));
    wait_for("web-1 over IPv6", Duration::from_secs(10), || {
        Ok((tcp(direct).ok().as_deref() == Some("web-1")).then_some(()))
    })?;
    let vip: SocketAddr = format!("[{VIP6}]:80").parse()?;
    wait_for("IPv6 frontend programmed", Duration::from_secs(10), || {
        Ok(tcp(vip).is_ok_and(|r| r == "web-1").then_some(()))
    })?;

    // What the GC removed so far (the probes above are not counted on).
    let removed_before = json(&node, &["status"])?["detail"]["conntrack"]["gcRemoved"]
        .as_u64()
        .unwrap_or_default();

    // A held connection (established, silent) and short-lived flows.
    let hold_addr: SocketAddr = format!("[{VIP6}]:81").parse()?;
    let mut open = client
        .netns()
        .enter_thread(move || TcpStream::connect_timeout(&hold_addr, Duration::from_secs(3)))??;
    let open_port = open.local_addr()?.port();
    for _ in 0..5 {
        assert_eq!(tcp(vip)?, "web-1");
    }
    let dns: SocketAddr = format!("[{VIP6}]:53").parse()?;
    let reply = client
        .netns()
        .enter_thread(move || -> std::io::Result<String> {
            let s = std::net::UdpSocket::bind("[::]:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send_to(b"q\n", dns)?;
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        })??;
    assert_eq!(reply, "web-1");

    // ct list: IPv6 entries in the socket-address form, resolved through
    // the LB6 maps.
    let ct: Vec<CtEntry> = serde_json::from_value(json(&node, &["ct", "list"])?)?;
    let v6: Vec<&CtEntry> = ct.iter().filter(|e| e.family == "IPv6").collect();
    assert!(
        v6.iter().any(|e| e.kind == "service"
            && e.dst == hold_addr.to_string()
            && e.backend == Some(format!("[{web_ip}]:8081"))),
        "{ct:?}"
    );
    assert!(
        v6.iter().any(|e| e.kind == "egress"
            && e.dst == format!("[{web_ip}]:8080")
            && e.rev_nat == Some(vip.to_string())
            && e.packets > 0),
        "{ct:?}"
    );
    assert!(
        v6.iter()
            .any(|e| e.proto == "UDP" && e.dst == dns.to_string()),
        "{ct:?}"
    );
    let short_lived = v6
        .iter()
        .filter(|e| !e.src.ends_with(&format!(":{open_port}")))
        .count();
    assert!(
        short_lived >= 12,
        "5 TCP + 1 UDP flows, 2 entries each: {ct:?}"
    );
    let table = ok(&node, &["ct", "list", "--address", VIP6])?;
    assert!(table.contains(&hold_addr.to_string()), "{table}");
    assert!(!table.contains("10.96.0.60"), "{table}");

    // bpf dumps: CT6 and LB6 rows next to the IPv4 ones.
    let bct = json(&node, &["bpf", "ct", "list"])?;
    assert!(
        bct["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["dst"] == hold_addr.to_string().as_str()),
        "{bct}"
    );
    assert!(
        bct["maps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "CT6" && m["entries"].as_u64() >= Some(2)),
        "{bct}"
    );
    let lb = json(&node, &["bpf", "lb", "list"])?;
    let rows = lb["entries"].as_array().unwrap();
    assert!(
        rows.iter()
            .any(|e| e["frontend"] == format!("{vip}/TCP").as_str() && e["slot"] == "0"),
        "{lb}"
    );
    assert!(
        rows.iter().any(|e| e["backend"]
            .as_str()
            .unwrap()
            .ends_with(&format!("[{web_ip}]:8080"))),
        "{lb}"
    );
    let lb_table = ok(&node, &["bpf", "lb", "list"])?;
    assert!(
        lb_table.contains("LB6_SERVICES:") && lb_table.contains("LB4_SERVICES:"),
        "{lb_table}"
    );

    // GC: the short-lived IPv6 flows expire (closing/any timeouts 3 s, GC
    // every 1 s); the open connection keeps both its entries.
    let left = wait_for("idle IPv6 flows collected", Duration::from_secs(20), || {
        let ct: Vec<CtEntry> = agent.client().get("/v1/ct")?;
        let v6: Vec<CtEntry> = ct.into_iter().filter(|e| e.family == "IPv6").collect();
        let others = v6
            .iter()
            .filter(|e| !e.src.ends_with(&format!(":{open_port}")))
            .count();
        Ok((others == 0).then_some(v6))
    })?;
    assert_eq!(
        left.len(),
        2,
        "the open connection keeps both entries: {left:?}"
    );
    let removed_after = json(&node, &["status"])?["detail"]["conntrack"]["gcRemoved"]
        .as_u64()
        .unwrap_or_default();
    assert!(
        removed_after >= removed_before + short_lived as u64,
        "GC counted {removed_before} -> {removed_after}, {short_lived} IPv6 entries were idle"
    );
    // The kept connection still carries traffic.
    open.set_read_timeout(Some(Duration::from_secs(3)))?;
    open.write_all(b"ping\n")?;
    let mut pong = String::new();
    open.read_to_string(&mut pong)?;
    assert_eq!(pong.trim(), "pong");
    held.join().expect("holder thread")?;
    drop(open);

    // ct flush removes the IPv6 entries too.
    let flushed = json(&node, &["ct", "flush"])?;
    assert!(flushed["removedIpv6"].as_u64() >= Some(2), "{flushed}");
    assert!(agent.client().get::<Vec<CtEntry>>("/v1/ct")?.is_empty());

    let _ = tcp_server.kill();
    let _ = tcp_server.wait();
    udp_server.stop()?;
    for pod in [&client, &web] {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    Ok(())
}
