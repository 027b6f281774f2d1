//! `catena-demo`: shows a newcomer what catena does, on a throwaway node.
//!
//! A network namespace plays the node; pods get their network from the real
//! `ptp` + `host-local` plugins with `catena-cni` chained after them;
//! `catena-agent` runs in standalone mode on a directory holding a ClusterIP
//! Service; a client pod calls the Service's virtual IP and we show which
//! backend answered. Everything is removed at the end.

use anyhow::{Context, Result};
use catena_api::{Endpoint, ServiceStatus};
use catena_lab::{CallArgs, CniRunner, Node, Pod};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const VIP: &str = "10.96.0.10";
const BACKENDS: [&str; 3] = ["web-1", "web-2", "web-3"];

fn main() {
    if let Err(e) = run() {
        eprintln!("\ndemo failed: {e:#}");
        std::process::exit(1);
    }
}

fn say(text: &str) {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() {
        println!("\n\x1b[1m==> {text}\x1b[0m");
    } else {
        println!("\n==> {text}");
    }
}

fn run() -> Result<()> {
    let started = Instant::now();
    say("Creating a throwaway node (a network namespace) for the demo");
    let node = Node::new("demo")?;
    println!("    node namespace: {}", node.netns().name());

    say("Writing the manifests catena-agent will watch (standalone mode, no cluster)");
    let manifests = node.dir().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: web}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n"
    );
    for name in BACKENDS {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: web}}}}\nspec: {{containers: [{{name: web, image: web}}]}}\n"
        ));
    }
    std::fs::write(manifests.join("web.yaml"), &yaml)?;
    println!("    Service default/web: ClusterIP {VIP}:80 -> pods labelled app=web, port 8080");

    say("Starting catena-agent (loads the eBPF programs, pins them, serves its API)");
    let agent = node.start_agent(&manifests, &[])?;
    let api = agent.client();
    let status: catena_api::Status = api.get("/v1/status")?;
    for (name, id) in &status.datapath.programs {
        println!("    program {name:<15} kernel id {id}");
    }
    println!("    pins under {}", node.bpffs_dir().display());

    say("The CNI conflist: ptp + host-local is the primary, catena-cni is chained after it");
    let conf = node.ptp_conflist("demo", "10.244.0.0/24", "0.3.1", vec![node.catena_plugin()])?;
    println!("{}", indent(&serde_json::to_string_pretty(&conf.raw)?));

    say("Creating pods through the chain (CNI ADD: ptp, then catena-cni)");
    let cni = CniRunner::new(&node, conf);
    let client = node.pod("client")?;
    let backends: Vec<Pod> = BACKENDS
        .iter()
        .map(|n| node.pod(n))
        .collect::<Result<_>>()?;
    for pod in std::iter::once(&client).chain(&backends) {
        let t = Instant::now();
        cni.add(pod, "eth0", &CallArgs::default())?;
        let ep: Endpoint = api.get(&catena_api::endpoint_path(&pod.container_id, "eth0"))?;
        println!(
            "    {:<7} {:<12} host veth {:<16} programs attached ({}) in {:>3} ms (whole chain)",
            pod.name,
            pod.ipv4()?,
            ep.spec.host_ifname,
            ep.attach_mode,
            t.elapsed().as_millis()
        );
    }
    let _servers: Vec<_> = backends
        .iter()
        .map(|p| p.serve_tcp(8080, &p.name))
        .collect::<Result<_>>()?;

    say("What the agent programmed (the `catena service list` command)");
    print_cli(&node, &["service", "list"])?;

    say(&format!("The client calls {VIP}:80, twelve times"));
    let vip: SocketAddr = format!("{VIP}:80").parse()?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=12 {
        let reply = client.tcp_request(vip, Duration::from_secs(3))?;
        let backend_ip = backends
            .iter()
            .find(|p| p.name == reply.text)
            .map(|p| p.ipv4().map(|ip| ip.to_string()))
            .transpose()?
            .unwrap_or_default();
        println!(
            "    request {i:>2}: answered by {} ({backend_ip}); the client saw the reply come from {}",
            reply.text, reply.peer
        );
        *tally.entry(reply.text).or_default() += 1;
    }
    println!("    tally: {tally:?}");

    say("Deleting web-3 (CNI DEL): it leaves the Service at once");
    cni.del(&backends[2], "eth0", &CallArgs::default())?;
    let services: Vec<ServiceStatus> = api.get("/v1/services")?;
    if let Some(s) = services.first() {
        println!("    {} {} -> {}", s.name, s.frontend, s.backends.join(", "));
    }
    let mut after: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..6 {
        *after
            .entry(client.tcp_request(vip, Duration::from_secs(3))?.text)
            .or_default() += 1;
    }
    println!("    six more requests: {after:?}");

    say("Tearing everything down");
    for pod in std::iter::once(&client).chain(&backends[..2]) {
        cni.del(pod, "eth0", &CallArgs::default())?;
    }
    let left: Vec<Endpoint> = api.get("/v1/endpoints")?;
    drop(cni);
    drop(agent);
    let name = node.netns().name().to_string();
    drop(client);
    drop(backends);
    drop(node);
    let gone = !catena_lab::list_netns()?.contains(&name);
    println!("    endpoints left in the agent: {}", left.len());
    println!(
        "    node namespace, pins, agent and pods removed: {}",
        if gone { "yes" } else { "NO" }
    );

    say(&format!(
        "Done in {:.1} s. What happened: ptp gave each pod an address and a veth; catena-cni found \
         each pod's host-side veth and registered it with catena-agent, which attached its eBPF \
         programs there; on the client's veth the program translated {VIP}:80 to a backend pod \
         and translated the replies back, so the client only ever talked to the Service IP.",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn print_cli(node: &Node, args: &[&str]) -> Result<()> {
    let cli = catena_lab::bin_path("catena")?;
    let out = Command::new(&cli)
        .arg("--socket")
        .arg(node.agent_socket())
        .args(args)
        .output()
        .with_context(|| format!("running {}", cli.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "catena {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
