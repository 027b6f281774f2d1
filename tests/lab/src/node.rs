//! A throwaway "node" (a network namespace plus scratch state) and its pods.

use crate::cni::{AddResult, Conflist};
use crate::netns::{next_unique, random_hex, Netns};
use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub(crate) const BPFFS_ROOT: &str = "/sys/fs/bpf";
pub(crate) const BPFFS_PREFIX: &str = "catena-lab-";
pub(crate) const TMP_PREFIX: &str = "catena-lab-";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A node: its own network namespace (where primaries put host veths and
/// routes, and where the agent and plugins run), a temp dir for conflists,
/// IPAM, the CNI cache and agent state, and a private bpffs directory.
///
/// Each node is isolated, so parallel tests may reuse the same pod subnet.
pub struct Node {
    netns: Netns,
    tmp: tempfile::TempDir,
    bpffs_dir: PathBuf,
}

impl Node {
    pub fn new(tag: &str) -> Result<Node> {
        let netns = Netns::new(&format!("n-{tag}"))?;
        let pid = std::process::id();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{pid}-{}-", next_unique()))
            .tempdir()
            .context("creating the node temp dir")?;
        ensure_bpffs()?;
        let bpffs_dir =
            Path::new(BPFFS_ROOT).join(format!("{BPFFS_PREFIX}{pid}-{}", next_unique()));
        std::fs::create_dir(&bpffs_dir)
            .with_context(|| format!("creating {}", bpffs_dir.display()))?;
        let node = Node {
            netns,
            tmp,
            bpffs_dir,
        };
        for sub in ["net.d", "ipam", "cni-cache", "state"] {
            std::fs::create_dir_all(node.dir().join(sub))?;
        }
        Ok(node)
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node's scratch dir (removed on Drop).
    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `<dir>/net.d`, where [`Conflist::write_to`] puts conflists for humans.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir().join("net.d")
    }

    /// host-local's `dataDir` for this node.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir().join("ipam")
    }

    /// libcni-style cache dir (`results/<net>-<cid>-<ifname>` below it).
    pub fn cni_cache_dir(&self) -> PathBuf {
        self.dir().join("cni-cache")
    }

    /// The agent's `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        self.dir().join("state")
    }

    /// The agent's `--socket`.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir().join("agent.sock")
    }

    /// The agent's log (stdout+stderr, appended across restarts).
    pub fn agent_log(&self) -> PathBuf {
        self.dir().join("agent.log")
    }

    /// The agent's `--bpffs-dir`, unique to this node.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// A new pod with its own namespace and a runtime-style 64-hex container id.
    pub fn pod(&self, name: &str) -> Result<Pod> {
        Ok(Pod {
            netns: Netns::new(&format!("p-{name}"))?,
            name: name.to_string(),
            namespace: "default".into(),
            uid: uuid_like(),
            container_id: random_hex(32),
            result: Mutex::new(None),
        })
    }

    /// catena's conflist entry for this node: only `type` is required; the
    /// socket and state dir point at this node's agent instead of the defaults.
    pub fn catena_plugin(&self) -> Value {
        json!({
            "type": "catena-cni",
            "agentSocket": self.agent_socket(),
            "stateDir": self.state_dir(),
        })
    }

    /// ptp + host-local (per-node `dataDir`, default route), then `extra`.
    pub fn ptp_conflist(
        &self,
        name: &str,
        subnet: &str,
        cni_version: &str,
        extra_plugins_after: Vec<Value>,
    ) -> Result<Conflist> {
        let mut plugins = vec![json!({
            "type": "ptp",
            // No masquerade: nothing leaves the node, and it keeps iptables out of the way.
            "ipMasq": false,
            "ipam": self.host_local(subnet),
        })];
        plugins.extend(extra_plugins_after);
        Ok(Conflist::from_value(
            json!({"cniVersion": cni_version, "name": name, "plugins": plugins}),
        )?)
    }

    /// bridge (`bridge` device in the node netns, gateway on it) + host-local, then `extra`.
    pub fn bridge_conflist(
        &self,
        name: &str,
        bridge: &str,
        subnet: &str,
        cni_version: &str,
        extra_plugins_after: Vec<Value>,
    ) -> Result<Conflist> {
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": self.host_local(subnet),
        })];
        plugins.extend(extra_plugins_after);
        Ok(Conflist::from_value(
            json!({"cniVersion": cni_version, "name": name, "plugins": plugins}),
        )?)
    }

    fn host_local(&self, subnet: &str) -> Value {
        json!({
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": self.ipam_dir(),
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Stop the agent and anything else inside before touching its pins.
        self.netns.kill_all();
        // Pins may still hold maps/programs; removing the files releases them.
        if self.bpffs_dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.bpffs_dir) {
                eprintln!("catena-lab: removing {}: {e}", self.bpffs_dir.display());
            }
        }
        // `netns` and `tmp` drop after this: processes inside are killed first.
    }
}

/// Mounts bpffs at /sys/fs/bpf unless one is there already.
fn ensure_bpffs() -> Result<()> {
    let st =
        nix::sys::statfs::statfs(BPFFS_ROOT).with_context(|| format!("statfs {BPFFS_ROOT}"))?;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS_ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {BPFFS_ROOT}"))
}

fn uuid_like() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A pod sandbox: its own network namespace plus the identity a runtime
/// would pass to CNI.
pub struct Pod {
    netns: Netns,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// 64 hex chars, like containerd/CRI-O sandbox ids.
    pub container_id: String,
    /// Last successful ADD through a [`crate::CniRunner`].
    result: Mutex<Option<AddResult>>,
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// `CNI_NETNS`.
    pub fn netns_path(&self) -> &Path {
        self.netns.path()
    }

    /// What containerd's CRI puts in `CNI_ARGS`.
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }

    pub(crate) fn set_result(&self, r: Option<AddResult>) {
        *self.result.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// The result of the last ADD (none after DEL).
    pub fn result(&self) -> Option<AddResult> {
        self.result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The pod's first IPv4 address from the last ADD.
    pub fn ipv4(&self) -> Result<Ipv4Addr> {
        self.result()
            .ok_or_else(|| anyhow!("pod {} has no ADD result", self.name))?
            .ipv4()
            .ok_or_else(|| anyhow!("pod {}'s ADD result has no IPv4 address", self.name))
    }

    /// Name (in `node`) of the host-side peer of the pod's `ifname` veth,
    /// found through the kernel (the veth's peer ifindex), not by guessing
    /// from the result's interface order.
    pub fn host_veth(&self, node: &Node, ifname: &str) -> Result<String> {
        let links = self.netns.links_json()?;
        let link = links
            .iter()
            .find(|l| l["ifname"] == ifname)
            .ok_or_else(|| anyhow!("no {ifname} in pod {}", self.name))?;
        let peer = link["link_index"]
            .as_u64()
            .ok_or_else(|| anyhow!("{ifname} in pod {} is not a veth: {link}", self.name))?;
        node.netns()
            .links_json()?
            .iter()
            .find(|l| l["ifindex"].as_u64() == Some(peer))
            .and_then(|l| l["ifname"].as_str().map(str::to_string))
            .ok_or_else(|| anyhow!("peer ifindex {peer} of {ifname} not in the node netns"))
    }
}
