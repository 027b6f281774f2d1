//! Executes a conflist's plugins with libcni's semantics, inside a node netns.
//!
//! What a chained plugin sees must match what containerd/podman send, or the
//! e2e tests prove nothing: VERSION before use, `name`/`cniVersion` injected
//! into every plugin object, `prevResult` from the previous plugin on ADD and
//! the cached final result on DEL/CHECK, `runtimeConfig` filtered through
//! each plugin's `capabilities`, DEL in reverse order.

use super::conflist::{validate_container_id, validate_ifname, validate_network_name};
use super::{version_ge, AddResult, CniError, Conflist, PluginError};
use crate::node::{Node, Pod};
use anyhow::Context;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where the reference plugins live on Debian.
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// A plugin that runs longer than this is killed (a hung plugin must fail the
/// test, not hang it).
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-call inputs a runtime controls.
#[derive(Clone, Debug, Default)]
pub struct CallArgs {
    /// `CNI_ARGS`; default: containerd's `K8S_POD_*` set from the pod.
    pub cni_args: Option<String>,
    /// Capability args (`portMappings`, `bandwidth`, ...); each plugin gets
    /// only those it declares in `capabilities`. On DEL, empty means "use
    /// what was cached at ADD" (as runtimes pass the same runtime config).
    pub capability_args: Map<String, Value>,
    /// Send an empty `CNI_NETNS` (containerd's repeated DEL after the sandbox is gone).
    pub omit_netns: bool,
    /// DEL without `prevResult` even if a result is cached.
    pub omit_prev_result: bool,
    /// Extra environment for every plugin of the call.
    pub env: Vec<(String, String)>,
}

impl CallArgs {
    /// The later DELs containerd 1.6's CRI issues: no netns, no prevResult.
    pub fn containerd_repeat_del() -> CallArgs {
        CallArgs {
            omit_netns: true,
            omit_prev_result: true,
            ..CallArgs::default()
        }
    }

    pub fn with_capability(mut self, key: &str, value: Value) -> CallArgs {
        self.capability_args.insert(key.to_string(), value);
        self
    }
}

/// One attachment for GC's `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Wall time of one plugin execution.
#[derive(Clone, Debug)]
pub struct CallTiming {
    pub plugin: String,
    pub command: String,
    pub container_id: String,
    pub elapsed: Duration,
}

/// What a plugin did, uninterpreted.
#[derive(Clone, Debug)]
pub struct PluginOutput {
    pub plugin: String,
    pub command: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl PluginOutput {
    /// Success: the JSON on stdout (None if stdout is empty). Failure: the
    /// parsed CNI error object, or [`CniError::Misbehaved`].
    pub fn into_json(self) -> Result<Option<Value>, CniError> {
        let stdout_text = String::from_utf8_lossy(&self.stdout).into_owned();
        let misbehaved = |reason: String| CniError::Misbehaved {
            plugin: self.plugin.clone(),
            command: self.command.clone(),
            reason,
            stdout: stdout_text.clone(),
            stderr: self.stderr.clone(),
        };
        let parsed = if stdout_text.trim().is_empty() {
            None
        } else {
            serde_json::from_str::<Value>(&stdout_text).ok()
        };
        if self.status.success() {
            return match (stdout_text.trim().is_empty(), parsed) {
                (true, _) => Ok(None),
                (false, Some(v)) => Ok(Some(v)),
                (false, None) => Err(misbehaved("exited 0 with non-JSON output".into())),
            };
        }
        match parsed
            .as_ref()
            .and_then(|v| v["code"].as_u64().map(|c| (v, c)))
        {
            Some((v, code)) => Err(CniError::Plugin(Box::new(PluginError {
                plugin: self.plugin.clone(),
                command: self.command.clone(),
                code: code as u32,
                msg: v["msg"].as_str().unwrap_or_default().to_string(),
                details: v["details"].as_str().unwrap_or_default().to_string(),
                stderr: self.stderr.clone(),
            }))),
            None => Err(misbehaved(format!(
                "{} without a CNI error object",
                self.status
            ))),
        }
    }
}

/// One plugin execution's input and output, kept when the runner records I/O
/// ([`CniRunner::with_io_recording`]): lets a test compare what a chained
/// plugin printed with the `prevResult` it was given.
#[derive(Clone, Debug)]
pub struct PluginCall {
    pub plugin: String,
    pub command: String,
    pub container_id: String,
    /// `CNI_IFNAME` of the call (empty for VERSION/GC/STATUS).
    pub ifname: String,
    pub stdin: Vec<u8>,
    pub stdout: Vec<u8>,
    pub success: bool,
}

impl PluginCall {
    /// For a chained plugin's successful ADD: checks that it printed exactly
    /// the `prevResult` it was given (byte for byte against that object as
    /// serialized on its stdin, and JSON-equal).
    pub fn check_passes_prev_result(&self) -> anyhow::Result<()> {
        let stdin: Value = serde_json::from_slice(&self.stdin)?;
        let prev = &stdin["prevResult"];
        anyhow::ensure!(
            prev.is_object(),
            "{} {} ran without a prevResult",
            self.plugin,
            self.command
        );
        let printed: Value = serde_json::from_slice(&self.stdout).with_context(|| {
            format!(
                "{} printed non-JSON: {:?}",
                self.plugin,
                String::from_utf8_lossy(&self.stdout)
            )
        })?;
        anyhow::ensure!(
            &printed == prev,
            "{} printed something else than its prevResult:\n  out: {printed}\n prev: {prev}",
            self.plugin
        );
        anyhow::ensure!(
            self.stdout == serde_json::to_vec(prev)?,
            "{}'s output is JSON-equal but not byte-equal to its prevResult:\n  out: {}\n prev: {prev}",
            self.plugin,
            String::from_utf8_lossy(&self.stdout)
        );
        Ok(())
    }
}

/// What libcni keeps per attachment (also written to disk as `cniCacheV1`).
#[derive(Clone, Debug)]
struct CacheEntry {
    container_id: String,
    ifname: String,
    netns: String,
    cni_args: String,
    capability_args: Map<String, Value>,
    result: Value,
}

/// Runs one conflist on one node. See the module docs for the semantics.
pub struct CniRunner<'n> {
    node: &'n Node,
    conflist: Conflist,
    cni_path: Vec<PathBuf>,
    timeout: Duration,
    versions_checked: Mutex<bool>,
    cache: Mutex<HashMap<(String, String), CacheEntry>>,
    timings: Mutex<Vec<CallTiming>>,
    record_io: bool,
    calls: Mutex<Vec<PluginCall>>,
}

/// One ADD/DEL/CHECK target.
struct Target {
    container_id: String,
    netns: String,
    ifname: String,
    cni_args: String,
}

impl<'n> CniRunner<'n> {
    /// `CNI_PATH` defaults to `/usr/lib/cni` then the catena bin dir.
    pub fn new(node: &'n Node, conflist: Conflist) -> CniRunner<'n> {
        let mut cni_path = vec![PathBuf::from(SYSTEM_CNI_DIR)];
        if let Ok(dir) = crate::bins::bin_dir() {
            cni_path.push(dir);
        }
        CniRunner {
            node,
            conflist,
            cni_path,
            timeout: DEFAULT_PLUGIN_TIMEOUT,
            versions_checked: Mutex::new(false),
            cache: Mutex::new(HashMap::new()),
            timings: Mutex::new(Vec::new()),
            record_io: false,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Keep every plugin execution's stdin and stdout ([`CniRunner::calls`]).
    pub fn with_io_recording(mut self) -> Self {
        self.record_io = true;
        self
    }

    /// Every plugin execution so far with its stdin/stdout (empty unless
    /// recording was turned on with [`CniRunner::with_io_recording`]).
    pub fn calls(&self) -> Vec<PluginCall> {
        lock(&self.calls).clone()
    }

    pub fn with_cni_path(mut self, dirs: Vec<PathBuf>) -> Self {
        self.cni_path = dirs;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn conflist(&self) -> &Conflist {
        &self.conflist
    }

    pub fn cni_path(&self) -> &[PathBuf] {
        &self.cni_path
    }

    /// Every plugin execution so far (including VERSION), in order.
    pub fn timings(&self) -> Vec<CallTiming> {
        lock(&self.timings).clone()
    }

    pub fn clear_timings(&self) {
        lock(&self.timings).clear();
    }

    /// VERSION on every plugin; errors if one does not support the
    /// conflist's version (empty version counts as 0.1.0, as in libcni).
    /// Returns the capabilities the conflist declares.
    pub fn validate(&self) -> Result<Vec<String>, CniError> {
        let want = if self.conflist.cni_version.is_empty() {
            "0.1.0"
        } else {
            &self.conflist.cni_version
        };
        for ty in self.conflist.plugin_types() {
            let stdin = serde_json::to_vec(&json!({ "cniVersion": want })).map_err(anyhow_err)?;
            let info = self
                .exec_plugin(ty, "VERSION", &[], &stdin)?
                .ok_or_else(|| CniError::Invalid(format!("plugin {ty}: empty VERSION answer")))?;
            let supported: Vec<&str> = info["supportedVersions"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !supported.contains(&want) {
                return Err(CniError::Invalid(format!(
                    "plugin {ty} does not support config version {want:?} (supports {supported:?})"
                )));
            }
        }
        *lock(&self.versions_checked) = true;
        let mut caps: Vec<String> = self
            .conflist
            .plugins
            .iter()
            .filter_map(|p| p.get("capabilities").and_then(Value::as_object))
            .flat_map(|c| c.iter().filter(|(_, v)| v == &&Value::Bool(true)))
            .map(|(k, _)| k.clone())
            .collect();
        caps.sort();
        caps.dedup();
        Ok(caps)
    }

    fn target(&self, pod: &Pod, ifname: &str, args: &CallArgs) -> Target {
        Target {
            container_id: pod.container_id.clone(),
            netns: if args.omit_netns {
                String::new()
            } else {
                pod.netns_path().display().to_string()
            },
            ifname: ifname.to_string(),
            cni_args: args.cni_args.clone().unwrap_or_else(|| pod.cni_args()),
        }
    }

    /// ADD through the chain; caches the final result (memory and disk) and
    /// records it on the pod. Runs VERSION on every plugin first, once per runner.
    pub fn add(&self, pod: &Pod, ifname: &str, args: &CallArgs) -> Result<AddResult, CniError> {
        let t = self.target(pod, ifname, args);
        validate_container_id(&t.container_id)?;
        validate_network_name(&self.conflist.name)?;
        validate_ifname(ifname)?;
        if !*lock(&self.versions_checked) {
            self.validate()?;
        }
        let start = Instant::now();
        let mut prev: Option<Value> = None;
        for plugin in &self.conflist.plugins {
            let conf = self.build_config(plugin, prev.as_ref(), &args.capability_args);
            let out = self.invoke(plugin, "ADD", &t, &args.env, &conf)?;
            prev = Some(out.ok_or_else(|| CniError::Misbehaved {
                plugin: plugin_type(plugin).into(),
                command: "ADD".into(),
                reason: "ADD succeeded without printing a result".into(),
                stdout: String::new(),
                stderr: String::new(),
            })?);
        }
        let raw = prev.unwrap_or(Value::Null);
        let result = AddResult::from_value(raw.clone(), start.elapsed());
        self.cache_put(CacheEntry {
            container_id: t.container_id,
            ifname: t.ifname,
            netns: t.netns,
            cni_args: t.cni_args,
            capability_args: args.capability_args.clone(),
            result: raw,
        })?;
        pod.set_result(Some(result.clone()));
        Ok(result)
    }

    /// DEL through the chain in reverse, with the cached final result as
    /// `prevResult` (0.4.0+), then forgets the cache entry. A second DEL
    /// runs without `prevResult`, as with libcni.
    pub fn del(&self, pod: &Pod, ifname: &str, args: &CallArgs) -> Result<(), CniError> {
        let t = self.target(pod, ifname, args);
        self.del_target(&t, args)?;
        pod.set_result(None);
        Ok(())
    }

    fn del_target(&self, t: &Target, args: &CallArgs) -> Result<(), CniError> {
        let cached = if version_ge(&self.conflist.cni_version, "0.4.0") {
            self.cache_get(&t.container_id, &t.ifname)
        } else {
            None
        };
        let prev = if args.omit_prev_result {
            None
        } else {
            cached.as_ref().map(|c| c.result.clone())
        };
        let caps = if args.capability_args.is_empty() {
            cached
                .as_ref()
                .map(|c| c.capability_args.clone())
                .unwrap_or_default()
        } else {
            args.capability_args.clone()
        };
        for plugin in self.conflist.plugins.iter().rev() {
            let conf = self.build_config(plugin, prev.as_ref(), &caps);
            self.invoke(plugin, "DEL", t, &args.env, &conf)?;
        }
        if cached.is_some() {
            self.cache_remove(&t.container_id, &t.ifname);
        }
        Ok(())
    }

    /// CHECK through the chain with the cached result (0.4.0+; a no-op with
    /// `disableCheck`).
    pub fn check(&self, pod: &Pod, ifname: &str, args: &CallArgs) -> Result<(), CniError> {
        if !version_ge(&self.conflist.cni_version, "0.4.0") {
            return Err(CniError::Invalid(format!(
                "configuration version {:?} does not support the CHECK command",
                self.conflist.cni_version
            )));
        }
        if self.conflist.disable_check {
            return Ok(());
        }
        let t = self.target(pod, ifname, args);
        let cached = self.cache_get(&t.container_id, &t.ifname);
        let prev = cached.as_ref().map(|c| c.result.clone());
        let caps = if args.capability_args.is_empty() {
            cached.map(|c| c.capability_args).unwrap_or_default()
        } else {
            args.capability_args.clone()
        };
        for plugin in &self.conflist.plugins {
            let conf = self.build_config(plugin, prev.as_ref(), &caps);
            self.invoke(plugin, "CHECK", &t, &args.env, &conf)?;
        }
        Ok(())
    }

    /// STATUS on every plugin (1.1.0+ conflists only; older ones: Ok).
    pub fn status(&self) -> Result<(), CniError> {
        if !version_ge(&self.conflist.cni_version, "1.1.0") {
            return Ok(());
        }
        let t = empty_target();
        for plugin in &self.conflist.plugins {
            let conf = self.build_config(plugin, None, &Map::new());
            self.invoke(plugin, "STATUS", &t, &[], &conf)?;
        }
        Ok(())
    }

    /// libcni's GC: DEL every cached attachment of this network that is not
    /// in `valid`, then (1.1.0+, unless `disableGC`) GC on every plugin with
    /// `cni.dev/valid-attachments`. All failures are reported together.
    pub fn gc(&self, valid: &[GcAttachment]) -> Result<(), CniError> {
        let mut errors = Vec::new();
        for entry in self.cached_attachments().map_err(CniError::Other)? {
            let key = GcAttachment {
                container_id: entry.container_id.clone(),
                ifname: entry.ifname.clone(),
            };
            if valid.contains(&key) {
                continue;
            }
            let t = Target {
                container_id: entry.container_id.clone(),
                netns: entry.netns.clone(),
                ifname: entry.ifname.clone(),
                cni_args: entry.cni_args.clone(),
            };
            let args = CallArgs {
                capability_args: entry.capability_args.clone(),
                ..CallArgs::default()
            };
            if let Err(e) = self.del_target(&t, &args) {
                errors.push(format!(
                    "failed to delete stale attachment {} {}: {e}",
                    t.container_id, t.ifname
                ));
            }
        }
        if version_ge(&self.conflist.cni_version, "1.1.0") && !self.conflist.disable_gc {
            let t = empty_target();
            for plugin in &self.conflist.plugins {
                let mut conf = self.build_config(plugin, None, &Map::new());
                conf.insert("cni.dev/valid-attachments".into(), json!(valid));
                if let Err(e) = self.invoke(plugin, "GC", &t, &[], &conf) {
                    errors.push(format!("failed to GC plugin {}: {e}", plugin_type(plugin)));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::Other(anyhow::anyhow!(errors.join("; "))))
        }
    }

    /// The plugin object plus `name`, `cniVersion`, `prevResult` (if any) and
    /// `runtimeConfig` holding only the capabilities the plugin declares.
    fn build_config(
        &self,
        plugin: &Map<String, Value>,
        prev: Option<&Value>,
        capability_args: &Map<String, Value>,
    ) -> Map<String, Value> {
        let mut conf = plugin.clone();
        conf.insert("name".into(), json!(self.conflist.name));
        conf.insert("cniVersion".into(), json!(self.conflist.cni_version));
        if let Some(prev) = prev {
            conf.insert("prevResult".into(), prev.clone());
        }
        let mut rc = Map::new();
        if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
            for (cap, on) in caps {
                if on == &Value::Bool(true) {
                    if let Some(v) = capability_args.get(cap) {
                        rc.insert(cap.clone(), v.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        conf
    }

    fn invoke(
        &self,
        plugin: &Map<String, Value>,
        command: &str,
        t: &Target,
        extra_env: &[(String, String)],
        conf: &Map<String, Value>,
    ) -> Result<Option<Value>, CniError> {
        let mut env: Vec<(&str, &str)> = vec![
            ("CNI_CONTAINERID", &t.container_id),
            ("CNI_NETNS", &t.netns),
            ("CNI_IFNAME", &t.ifname),
            ("CNI_ARGS", &t.cni_args),
        ];
        env.extend(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let stdin = serde_json::to_vec(conf).map_err(anyhow_err)?;
        let out =
            self.exec_plugin_raw_for(plugin_type(plugin), command, &env, &stdin, &t.container_id)?;
        out.into_json()
    }

    /// Runs plugin `plugin_type` once with `CNI_COMMAND=command`, `CNI_PATH`
    /// (unless `env` sets it) and `env`, in the node netns, and interprets
    /// the answer. For feeding plugins bad input.
    pub fn exec_plugin(
        &self,
        plugin_type: &str,
        command: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> Result<Option<Value>, CniError> {
        self.exec_plugin_raw(plugin_type, command, env, stdin)?
            .into_json()
    }

    /// Like [`CniRunner::exec_plugin`] but returns the raw exit status and output.
    pub fn exec_plugin_raw(
        &self,
        plugin_type: &str,
        command: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> Result<PluginOutput, CniError> {
        let cid = env
            .iter()
            .find(|(k, _)| *k == "CNI_CONTAINERID")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        self.exec_plugin_raw_for(plugin_type, command, env, stdin, &cid)
    }

    fn exec_plugin_raw_for(
        &self,
        plugin_type: &str,
        command: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
        container_id: &str,
    ) -> Result<PluginOutput, CniError> {
        let path = self.find_plugin(plugin_type)?;
        let mut cmd = Command::new(&path);
        // Like libcni: the runtime's environment, minus any CNI_* of our own,
        // plus the call's CNI_* (set even when empty).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        let cni_path = std::env::join_paths(&self.cni_path).context("joining CNI_PATH")?;
        cmd.env("CNI_COMMAND", command).env("CNI_PATH", cni_path);
        for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"] {
            cmd.env(var, "");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = self.node.netns().spawn(cmd)?;
        let mut child_stdin = child.stdin.take().expect("piped stdin");
        let input = stdin.to_vec();
        // Separate threads so a plugin that ignores stdin or fills a pipe
        // cannot deadlock us.
        let writer = std::thread::spawn(move || {
            let _ = child_stdin.write_all(&input);
        });
        let mut so = child.stdout.take().expect("piped stdout");
        let mut se = child.stderr.take().expect("piped stderr");
        let out_reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = so.read_to_end(&mut b);
            b
        });
        let err_reader = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = se.read_to_end(&mut b);
            b
        });
        let deadline = start + self.timeout;
        let status = loop {
            if let Some(st) = child.try_wait().context("waiting for plugin")? {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let elapsed = start.elapsed();
        let _ = writer.join();
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
        lock(&self.timings).push(CallTiming {
            plugin: plugin_type.to_string(),
            command: command.to_string(),
            container_id: container_id.to_string(),
            elapsed,
        });
        if self.record_io {
            let ifname = env
                .iter()
                .find(|(k, _)| *k == "CNI_IFNAME")
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            lock(&self.calls).push(PluginCall {
                plugin: plugin_type.to_string(),
                command: command.to_string(),
                container_id: container_id.to_string(),
                ifname,
                stdin: stdin.to_vec(),
                stdout: stdout.clone(),
                success: status.is_some_and(|s| s.success()),
            });
        }
        let Some(status) = status else {
            return Err(CniError::Misbehaved {
                plugin: plugin_type.into(),
                command: command.into(),
                reason: format!("killed after {:?} timeout", self.timeout),
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr,
            });
        };
        Ok(PluginOutput {
            plugin: plugin_type.into(),
            command: command.into(),
            status,
            stdout,
            stderr,
            elapsed,
        })
    }

    fn find_plugin(&self, plugin_type: &str) -> Result<PathBuf, CniError> {
        self.cni_path
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| is_executable(p))
            .ok_or_else(|| {
                CniError::Invalid(format!(
                    "failed to find plugin {plugin_type:?} in path {:?}",
                    self.cni_path
                ))
            })
    }

    // ----- cache (libcni's `results/<net>-<cid>-<ifname>`, cniCacheV1) -----

    fn cache_file(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.node
            .cni_cache_dir()
            .join("results")
            .join(format!("{}-{container_id}-{ifname}", self.conflist.name))
    }

    fn cache_put(&self, e: CacheEntry) -> Result<(), CniError> {
        let file = self.cache_file(&e.container_id, &e.ifname);
        let config = serde_json::to_vec(&self.conflist.raw).map_err(anyhow_err)?;
        let doc = json!({
            "kind": "cniCacheV1",
            "containerId": e.container_id,
            // Go marshals []byte as base64.
            "config": base64(&config),
            "ifName": e.ifname,
            "networkName": self.conflist.name,
            "netns": e.netns,
            "cniArgs": split_cni_args(&e.cni_args),
            "capabilityArgs": e.capability_args,
            "result": e.result,
        });
        std::fs::create_dir_all(file.parent().expect("cache file has a dir"))
            .context("creating the CNI cache dir")?;
        std::fs::write(&file, serde_json::to_vec(&doc).map_err(anyhow_err)?)
            .with_context(|| format!("writing {}", file.display()))?;
        lock(&self.cache).insert((e.container_id.clone(), e.ifname.clone()), e);
        Ok(())
    }

    fn cache_get(&self, container_id: &str, ifname: &str) -> Option<CacheEntry> {
        if let Some(e) = lock(&self.cache).get(&(container_id.to_string(), ifname.to_string())) {
            return Some(e.clone());
        }
        // Another runner on the same node (or an earlier one) may have added it.
        read_cache_file(&self.cache_file(container_id, ifname))
    }

    fn cache_remove(&self, container_id: &str, ifname: &str) {
        lock(&self.cache).remove(&(container_id.to_string(), ifname.to_string()));
        let _ = std::fs::remove_file(self.cache_file(container_id, ifname));
    }

    /// Cached attachments of this network on this node (from disk).
    fn cached_attachments(&self) -> anyhow::Result<Vec<CacheEntry>> {
        let dir = self.node.cni_cache_dir().join("results");
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if let Some(e) = read_cache_file(&p) {
                if read_network_name(&p).as_deref() == Some(self.conflist.name.as_str()) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }
}

fn read_cache_doc(path: &Path) -> Option<Value> {
    let doc: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (doc["kind"] == "cniCacheV1").then_some(doc)
}

fn read_network_name(path: &Path) -> Option<String> {
    read_cache_doc(path)?["networkName"]
        .as_str()
        .map(str::to_string)
}

fn read_cache_file(path: &Path) -> Option<CacheEntry> {
    let doc = read_cache_doc(path)?;
    let s = |k: &str| doc[k].as_str().unwrap_or_default().to_string();
    let cni_args = doc["cniArgs"]
        .as_array()
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| Some(format!("{}={}", p[0].as_str()?, p[1].as_str()?)))
                .collect::<Vec<_>>()
                .join(";")
        })
        .unwrap_or_default();
    Some(CacheEntry {
        container_id: s("containerId"),
        ifname: s("ifName"),
        netns: s("netns"),
        cni_args,
        capability_args: doc["capabilityArgs"]
            .as_object()
            .cloned()
            .unwrap_or_default(),
        result: doc["result"].clone(),
    })
}

fn empty_target() -> Target {
    Target {
        container_id: String::new(),
        netns: String::new(),
        ifname: String::new(),
        cni_args: String::new(),
    }
}

fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `K=V;K=V` -> `[[K,V],...]` (libcni caches args as pairs).
fn split_cni_args(args: &str) -> Vec<[String; 2]> {
    args.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => [k.to_string(), v.to_string()],
            None => [kv.to_string(), String::new()],
        })
        .collect()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn anyhow_err(e: impl std::error::Error + Send + Sync + 'static) -> CniError {
    CniError::Other(anyhow::Error::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_go() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"{\"a\":1}"), "eyJhIjoxfQ==");
    }

    #[test]
    fn cni_args_split_into_pairs() {
        assert_eq!(
            split_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a"),
            vec![
                ["IgnoreUnknown".to_string(), "1".to_string()],
                ["K8S_POD_NAME".to_string(), "a".to_string()]
            ]
        );
    }
}
