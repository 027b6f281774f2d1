//! Installing catena into a node's CNI configuration: what the chart's
//! `install-cni` init container and (with `cni.uninstall`) the agent's preStop
//! hook run.
//!
//! The rules, in order of importance:
//! * Never edit the primary's files. catena writes its own conflist
//!   (`05-catena.conflist` by default) that sorts before the primary's, so the
//!   runtime (which uses the lexicographically first config) picks it;
//!   removing that one file is a complete uninstall and the primary's config is
//!   what new pods get again (Cilium #27715 left nodes where no pod could start).
//! * The primary's plugin entries are copied byte for byte (see [`conflist`]).
//! * Every step is idempotent: re-running an init container after a crash or a
//!   node reboot changes nothing when nothing changed.
//! * Every write is a temp file plus rename in the same directory, so the
//!   runtime, which watches the directory, never reads half a file. Temp names
//!   start with a dot and end in `.tmp`, extensions libcni ignores.

pub mod conflist;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use conflist::CatenaEntry;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Default name of catena's conflist: `05-` sorts before the `10-` that
/// Calico and flannel use and the `10-kube-ovn` seed 004 renames kube-ovn's to.
pub const DEFAULT_CONF_FILE_NAME: &str = "05-catena.conflist";
/// Suffix for configurations moved aside by `--exclusive`.
pub const BACKUP_SUFFIX: &str = ".catena-bak";
/// Extensions libcni loads from the conf dir (`ConfFiles(dir, [.conf, .conflist, .json])`).
const CNI_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// Which primary catena chains after. Apart from `none` the modes write the
/// same kind of file; they differ in the network name looked for when no
/// `--chaining-target` is given, and `portmap` checks the primary chains portmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ChainingMode {
    /// Any plugin that gives each pod a veth (ptp, bridge, ...): chain after
    /// the configuration the runtime would use now.
    GenericVeth,
    /// kube-ovn (network name "kube-ovn").
    KubeOvn,
    /// Calico (network name "k8s-pod-network").
    Calico,
    /// flannel (network name "cbr0").
    Flannel,
    /// A primary whose conflist already chains `portmap` (hostPorts).
    Portmap,
    /// Write no conflist: only the `catena-cni` binary is installed (the
    /// operator wires the conflist, or the agent runs standalone).
    None,
}

impl ChainingMode {
    /// The network name the primary's own installer uses by default.
    pub fn default_network(self) -> Option<&'static str> {
        match self {
            ChainingMode::KubeOvn => Some("kube-ovn"),
            ChainingMode::Calico => Some("k8s-pod-network"),
            ChainingMode::Flannel => Some("cbr0"),
            _ => None,
        }
    }
}

/// Flags of `catena-agent install-cni` / `catena-agent uninstall-cni`.
#[derive(Clone, Debug, Args)]
pub struct InstallArgs {
    /// The node's CNI configuration directory (as mounted in the container).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// The node's CNI plugin directory; `catena-cni` is copied here.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// The primary catena chains after.
    #[arg(long, value_enum, default_value_t = ChainingMode::GenericVeth)]
    pub chaining_mode: ChainingMode,

    /// Network `name` of the primary's configuration to chain after (instead
    /// of the one the runtime would pick).
    #[arg(long)]
    pub chaining_target: Option<String>,

    /// A complete chained conflist to install as-is (cni.customConf: the
    /// mounted ConfigMap key). Overrides --chaining-mode.
    #[arg(long, value_name = "FILE")]
    pub custom_conf: Option<PathBuf>,

    /// File name of catena's conflist; must sort before the primary's.
    #[arg(long, default_value = DEFAULT_CONF_FILE_NAME)]
    pub conf_file_name: String,

    /// Move every other configuration aside (`<name>.catena-bak`) so only
    /// catena's is loaded; uninstall moves them back. Off for chaining: the
    /// primary's files stay where they are.
    #[arg(long)]
    pub exclusive: bool,

    /// The `catena-cni` binary to install.
    #[arg(long, default_value = "/usr/local/bin/catena-cni")]
    pub cni_binary: PathBuf,

    /// Do not copy the binary (it is managed some other way).
    #[arg(long)]
    pub skip_cni_binary: bool,

    /// Uninstall only: also delete `catena-cni` from the bin dir. Off by
    /// default: a runtime that deletes a pod with its cached chained config
    /// still calls catena-cni, and its DEL must not fail.
    #[arg(long)]
    pub remove_cni_binary: bool,

    /// `agentSocket` for catena's conflist entry (only when not the default).
    #[arg(long)]
    pub cni_agent_socket: Option<String>,

    /// `stateDir` for catena's conflist entry (only when not the default).
    #[arg(long)]
    pub cni_state_dir: Option<String>,

    /// `logFile` for catena's conflist entry.
    #[arg(long)]
    pub cni_log_file: Option<String>,
}

impl InstallArgs {
    /// Defaults for a node laid out under `conf_dir`/`bin_dir` (tests, tools).
    pub fn new(conf_dir: impl Into<PathBuf>, bin_dir: impl Into<PathBuf>) -> InstallArgs {
        InstallArgs {
            cni_conf_dir: conf_dir.into(),
            cni_bin_dir: bin_dir.into(),
            chaining_mode: ChainingMode::GenericVeth,
            chaining_target: None,
            custom_conf: None,
            conf_file_name: DEFAULT_CONF_FILE_NAME.into(),
            exclusive: false,
            cni_binary: PathBuf::from("/usr/local/bin/catena-cni"),
            skip_cni_binary: true,
            remove_cni_binary: false,
            cni_agent_socket: None,
            cni_state_dir: None,
            cni_log_file: None,
        }
    }

    fn entry(&self) -> CatenaEntry {
        CatenaEntry {
            agent_socket: self.cni_agent_socket.clone(),
            state_dir: self.cni_state_dir.clone(),
            log_file: self.cni_log_file.clone(),
        }
    }

    fn conf_path(&self) -> Result<PathBuf> {
        let name = &self.conf_file_name;
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            bail!("--conf-file-name {name:?} must be a plain file name");
        }
        // containerd and CRI-O read only *.conflist files as lists; a list
        // under .conf would be parsed as a single plugin and fail.
        if !name.ends_with(".conflist") {
            bail!("--conf-file-name {name:?} must end in .conflist");
        }
        Ok(self.cni_conf_dir.join(name))
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAction {
    Written,
    Unchanged,
    Removed,
    Absent,
}

impl fmt::Display for FileAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileAction::Written => "written",
            FileAction::Unchanged => "unchanged",
            FileAction::Removed => "removed",
            FileAction::Absent => "absent",
        })
    }
}

/// What `install` did, for the init container's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// catena's conflist and what happened to it (`None`: chaining mode none).
    pub conflist: Option<(PathBuf, FileAction)>,
    /// The primary configuration chained after (`None` for customConf).
    pub primary: Option<PathBuf>,
    /// The installed binary (`None` with --skip-cni-binary).
    pub binary: Option<(PathBuf, FileAction)>,
    /// Configurations moved aside by --exclusive.
    pub moved_aside: Vec<PathBuf>,
    /// Problems that do not stop the install but need an operator's eye.
    pub warnings: Vec<String>,
}

/// What `uninstall` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UninstallReport {
    pub conflist: (PathBuf, FileAction),
    pub restored: Vec<PathBuf>,
    pub binary: Option<(PathBuf, FileAction)>,
    /// The configuration the runtime will use from now on, if any.
    pub now_active: Option<PathBuf>,
    pub warnings: Vec<String>,
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.conflist {
            Some((p, a)) => write!(f, "conflist {} {a}", p.display())?,
            None => write!(f, "no conflist (chaining mode none)")?,
        }
        if let Some(p) = &self.primary {
            write!(f, ", chained after {}", p.display())?;
        }
        if let Some((p, a)) = &self.binary {
            write!(f, "; binary {} {a}", p.display())?;
        }
        for p in &self.moved_aside {
            write!(f, "; moved aside {}", p.display())?;
        }
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

impl fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conflist {} {}",
            self.conflist.0.display(),
            self.conflist.1
        )?;
        for p in &self.restored {
            write!(f, "; restored {}", p.display())?;
        }
        if let Some((p, a)) = &self.binary {
            write!(f, "; binary {} {a}", p.display())?;
        }
        match &self.now_active {
            Some(p) => write!(f, "; the runtime now uses {}", p.display())?,
            None => write!(f, "; no CNI configuration is left in the directory")?,
        }
        for w in &self.warnings {
            write!(f, "\nwarning: {w}")?;
        }
        Ok(())
    }
}

/// Install catena's conflist (chaining or custom) and the CNI binary.
/// On error nothing in the conf dir has been changed.
pub fn install(args: &InstallArgs) -> Result<InstallReport> {
    let conf_path = args.conf_path()?;
    let mut warnings = Vec::new();

    // Compute everything before touching the disk, so a broken primary or
    // ConfigMap leaves the node exactly as it was.
    let planned: Option<(String, Option<PathBuf>)> = if let Some(custom) = &args.custom_conf {
        let text = fs::read_to_string(custom)
            .with_context(|| format!("reading custom conflist {}", custom.display()))?;
        let w = conflist::validate_custom(&text)
            .with_context(|| format!("custom conflist {} (cni.customConf)", custom.display()))?;
        warnings.extend(w);
        Some((text, None))
    } else if args.chaining_mode == ChainingMode::None {
        None
    } else {
        let primary = find_primary(args, &conf_path, &mut warnings)?;
        let text = fs::read_to_string(&primary)
            .with_context(|| format!("reading {}", primary.display()))?;
        if args.chaining_mode == ChainingMode::Portmap {
            let types = conflist::plugin_types(&conflist::parse(&text)?);
            if !types.iter().any(|t| t == "portmap") {
                bail!(
                    "chaining mode portmap: {} chains no portmap plugin (plugins [{}]); use generic-veth",
                    primary.display(),
                    types.join(", ")
                );
            }
        }
        let chained = conflist::chain(&text, &args.entry()).with_context(|| {
            format!(
                "primary CNI configuration {} cannot be chained; nothing was changed",
                primary.display()
            )
        })?;
        Some((chained, Some(primary)))
    };

    let mut report = InstallReport {
        conflist: None,
        primary: None,
        binary: None,
        moved_aside: Vec::new(),
        warnings: Vec::new(),
    };

    // The binary first: a conflist naming catena-cni before the binary is in
    // place would fail every pod ADD in between.
    if !args.skip_cni_binary {
        let dest = args.cni_bin_dir.join(conflist::CATENA_TYPE);
        let action = install_binary(&args.cni_binary, &dest)?;
        report.binary = Some((dest, action));
    }

    if let Some((text, primary)) = planned {
        let action = write_atomic(&conf_path, text.as_bytes(), 0o644)?;
        report.conflist = Some((conf_path.clone(), action));
        report.primary = primary;
        if args.exclusive {
            report.moved_aside = move_others_aside(&args.cni_conf_dir, &conf_path)?;
        } else if let Some(first) = runtime_pick(&args.cni_conf_dir)? {
            if first != conf_path {
                warnings.push(format!(
                    "{} sorts before {}, so the runtime keeps using it and pods bypass catena; rename it (seed 004: mv 01-kube-ovn.conflist 10-kube-ovn.conflist) or pick a --conf-file-name that sorts first",
                    first.display(),
                    conf_path.display()
                ));
            }
        }
    }
    report.warnings = warnings;
    Ok(report)
}

/// Remove catena's conflist (and restore what --exclusive moved aside), so
/// the primary's own configuration is what the runtime uses again.
pub fn uninstall(args: &InstallArgs) -> Result<UninstallReport> {
    let conf_path = args.conf_path()?;
    let mut warnings = Vec::new();
    let action = match fs::read_to_string(&conf_path) {
        Ok(text) => {
            // Only ever delete a file that is catena's: the name could have
            // been configured to collide with someone else's.
            let ours = conflist::parse(&text)
                .map(|c| conflist::has_catena(&c))
                .unwrap_or(false);
            if !ours {
                bail!(
                    "{} holds no \"catena-cni\" plugin; not removing a file catena did not write",
                    conf_path.display()
                );
            }
            fs::remove_file(&conf_path)
                .with_context(|| format!("removing {}", conf_path.display()))?;
            FileAction::Removed
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileAction::Absent,
        Err(e) => return Err(e).with_context(|| format!("reading {}", conf_path.display())),
    };
    let restored = restore_moved_aside(&args.cni_conf_dir, &mut warnings)?;
    let binary = if args.remove_cni_binary {
        let dest = args.cni_bin_dir.join(conflist::CATENA_TYPE);
        let a = match fs::remove_file(&dest) {
            Ok(()) => FileAction::Removed,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileAction::Absent,
            Err(e) => return Err(e).with_context(|| format!("removing {}", dest.display())),
        };
        Some((dest, a))
    } else {
        None
    };
    let now_active = runtime_pick(&args.cni_conf_dir)?;
    if let Some(active) = &now_active {
        if let Ok(text) = fs::read_to_string(active) {
            if conflist::parse(&text).is_ok_and(|c| conflist::has_catena(&c)) {
                warnings.push(format!(
                    "{} still chains catena-cni and is what the runtime uses; new pods will need a running catena agent",
                    active.display()
                ));
            }
        }
    }
    Ok(UninstallReport {
        conflist: (conf_path, action),
        restored,
        binary,
        now_active,
        warnings,
    })
}

/// Files libcni would load from `dir`, sorted by name (Go's `os.ReadDir`
/// order, which is byte order).
fn cni_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let ext_ok = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CNI_EXTENSIONS.contains(&e));
        // is_file follows symlinks, as the runtimes do (some installers link
        // their config in from elsewhere).
        if ext_ok && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The configuration a runtime (containerd's go-cni, CRI-O) would use now.
fn runtime_pick(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(cni_files(dir)?.into_iter().next())
}

/// The primary's configuration: the named network if a target is given (or
/// the mode has a well-known name that is present), else the file the
/// runtime would pick, never catena's own.
fn find_primary(
    args: &InstallArgs,
    conf_path: &Path,
    warnings: &mut Vec<String>,
) -> Result<PathBuf> {
    let dir = &args.cni_conf_dir;
    let mut files = cni_files(dir)?;
    if args.exclusive {
        // A re-run (init containers run again on every pod restart) finds
        // the primary where the first run put it.
        files.extend(backups(dir)?);
        files.sort_by_key(|p| sort_name(p));
    }
    let mut candidates = Vec::new();
    for path in files {
        if path == conf_path {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if conflist::parse(&text).is_ok_and(|c| conflist::has_catena(&c)) {
                continue; // our own earlier output
            }
            bail!(
                "{} exists and is not catena's (it chains no catena-cni): it looks like the primary's own file; choose another --conf-file-name",
                path.display()
            );
        }
        candidates.push(path);
    }
    if candidates.is_empty() {
        bail!(
            "no CNI configuration in {}: install the primary CNI first (catena chains after it); this step is retried",
            dir.display()
        );
    }
    let wanted = args.chaining_target.clone().map(|t| (t, true)).or_else(|| {
        args.chaining_mode
            .default_network()
            .map(|n| (n.to_owned(), false))
    });
    if let Some((name, explicit)) = wanted {
        let mut names = Vec::new();
        for path in &candidates {
            let text =
                fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            match conflist::network_name(&text) {
                Some(n) if n == name => return Ok(path.clone()),
                Some(n) => names.push(format!("{} ({n})", file_name(path))),
                None => {
                    warnings.push(format!(
                        "skipped {}: not a parseable CNI configuration",
                        path.display()
                    ));
                    names.push(format!("{} (unparseable)", file_name(path)));
                }
            }
        }
        if explicit {
            bail!(
                "no CNI configuration in {} has network name {name:?} (--chaining-target); found: {}",
                dir.display(),
                names.join(", ")
            );
        }
        warnings.push(format!(
            "no configuration named {name:?} (the {:?} default); chaining after the one the runtime uses",
            args.chaining_mode
        ));
    }
    Ok(candidates.remove(0))
}

/// The name a file sorts under: a backup sorts where its original did.
fn sort_name(p: &Path) -> String {
    let n = file_name(p);
    n.strip_suffix(BACKUP_SUFFIX)
        .map(str::to_owned)
        .unwrap_or(n)
}

/// Configurations moved aside by --exclusive.
fn backups(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| file_name(p).ends_with(BACKUP_SUFFIX) && p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Write `data` to `path` via a dot-temp file and rename; skip when the
/// content and the mode are already right (a copy that lost its exec bit is
/// rewritten, not reported unchanged).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<FileAction> {
    use std::os::unix::fs::PermissionsExt;
    let mode_ok = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    if mode_ok && fs::read(path).is_ok_and(|cur| cur == data) {
        return Ok(FileAction::Unchanged);
    }
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.{}.tmp", file_name(path), std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(FileAction::Written)
}

/// Copy the plugin binary. Rename over the old one rather than writing into
/// it: a running catena-cni keeps its inode, and writing into an executing
/// file fails with ETXTBSY.
fn install_binary(src: &Path, dest: &Path) -> Result<FileAction> {
    let data = fs::read(src)
        .with_context(|| format!("reading the catena-cni binary {}", src.display()))?;
    write_atomic(dest, &data, 0o755)
}

fn move_others_aside(dir: &Path, keep: &Path) -> Result<Vec<PathBuf>> {
    let mut moved = Vec::new();
    for path in cni_files(dir)? {
        if path == keep {
            continue;
        }
        let mut backup = path.clone().into_os_string();
        backup.push(BACKUP_SUFFIX);
        fs::rename(&path, &backup).with_context(|| format!("moving {} aside", path.display()))?;
        moved.push(path);
    }
    Ok(moved)
}

fn restore_moved_aside(dir: &Path, warnings: &mut Vec<String>) -> Result<Vec<PathBuf>> {
    let mut restored = Vec::new();
    for backup in backups(dir)? {
        let s = backup.to_string_lossy();
        let original = PathBuf::from(&s[..s.len() - BACKUP_SUFFIX.len()]);
        if original.exists() {
            // The primary wrote a fresh config meanwhile; it wins.
            warnings.push(format!(
                "{} exists again; left {} in place",
                original.display(),
                backup.display()
            ));
            continue;
        }
        fs::rename(&backup, &original)
            .with_context(|| format!("restoring {}", original.display()))?;
        restored.push(original);
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// seed 004's kube-ovn conflist as kube-ovn's installer writes it.
    const KUBE_OVN: &str = r#"{
  "name":"kube-ovn",
  "cniVersion":"0.3.1",
  "plugins":[
    {
      "type":"kube-ovn",
      "server_socket":"/run/openvswitch/kube-ovn-daemon.sock",
      "ipam":{
        "type":"kube-ovn",
        "server_socket":"/run/openvswitch/kube-ovn-daemon.sock"
      }
    },
    {
      "type":"portmap",
      "capabilities":{
        "portMappings":true
      }
    }
  ]
}
"#;
    const PTP: &str = r#"{"cniVersion":"1.0.0","name":"ptpnet","plugins":[{"type":"ptp","ipMasq":true,"ipam":{"type":"host-local","subnet":"10.99.0.0/24"}}]}"#;

    struct Node {
        _dir: tempfile::TempDir,
        conf: PathBuf,
        bin: PathBuf,
        plugin: PathBuf,
    }

    fn node(files: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&bin).unwrap();
        for (name, text) in files {
            fs::write(conf.join(name), text).unwrap();
        }
        let plugin = dir.path().join("catena-cni-build");
        fs::write(&plugin, b"\x7fELF fake catena-cni").unwrap();
        Node {
            _dir: dir,
            conf,
            bin,
            plugin,
        }
    }

    impl Node {
        fn args(&self) -> InstallArgs {
            let mut a = InstallArgs::new(&self.conf, &self.bin);
            a.cni_binary = self.plugin.clone();
            a.skip_cni_binary = false;
            a
        }
        fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
            fs::read_dir(&self.conf)
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    (file_name(&p), fs::read(&p).unwrap())
                })
                .collect()
        }
        fn catena(&self) -> String {
            fs::read_to_string(self.conf.join(DEFAULT_CONF_FILE_NAME)).unwrap()
        }
    }

    #[test]
    fn install_chains_after_the_runtime_pick_and_is_idempotent() {
        let n = node(&[
            ("10-kube-ovn.conflist", KUBE_OVN),
            ("20-other.conflist", PTP),
        ]);
        let before = n.snapshot();
        let r = install(&n.args()).unwrap();
        assert_eq!(
            r.primary.as_deref(),
            Some(n.conf.join("10-kube-ovn.conflist").as_path())
        );
        assert_eq!(r.conflist.as_ref().unwrap().1, FileAction::Written);
        assert_eq!(r.binary.as_ref().unwrap().1, FileAction::Written);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        let out = n.catena();
        let parsed = conflist::parse(&out).unwrap();
        assert_eq!(
            conflist::plugin_types(&parsed),
            ["kube-ovn", "portmap", "catena-cni"]
        );
        // The kube-ovn entry, byte for byte (indentation included).
        let entry_start = KUBE_OVN.find("    {\n      \"type\":\"kube-ovn\"").unwrap();
        let entry_end = KUBE_OVN
            .find("    },\n    {\n      \"type\":\"portmap\"")
            .unwrap()
            + 6;
        assert!(out.contains(&KUBE_OVN[entry_start..entry_end]), "{out}");
        // The primary's files are untouched.
        let mut after = n.snapshot();
        after.remove(DEFAULT_CONF_FILE_NAME);
        assert_eq!(before, after);
        let bin = n.bin.join("catena-cni");
        assert_eq!(fs::read(&bin).unwrap(), b"\x7fELF fake catena-cni");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );

        // Second run: nothing changes, not even the mtime-relevant write.
        let snap = n.snapshot();
        let r2 = install(&n.args()).unwrap();
        assert_eq!(r2.conflist.unwrap().1, FileAction::Unchanged);
        assert_eq!(r2.binary.unwrap().1, FileAction::Unchanged);
        assert_eq!(snap, n.snapshot());
        // No temp files left behind.
        assert!(n.snapshot().keys().all(|k| !k.ends_with(".tmp")));

        // Same bytes but no exec bit (a copy by hand, a restore from
        // backup): not "unchanged", made executable again.
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o644)).unwrap();
        let r3 = install(&n.args()).unwrap();
        assert_eq!(r3.binary.unwrap().1, FileAction::Written);
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn existing_catena_entry_is_replaced_not_duplicated() {
        let n = node(&[("10-ptp.conflist", PTP)]);
        install(&n.args()).unwrap();
        let mut a = n.args();
        a.cni_agent_socket = Some("/run/catena/other.sock".into());
        let r = install(&a).unwrap();
        assert_eq!(r.conflist.unwrap().1, FileAction::Written);
        let out = n.catena();
        assert_eq!(out.matches("catena-cni").count(), 1, "{out}");
        assert!(out.contains("/run/catena/other.sock"));
        assert!(out.starts_with(r#"{"cniVersion":"1.0.0","name":"ptpnet","plugins":[{"type":"ptp","ipMasq":true,"ipam":{"type":"host-local","subnet":"10.99.0.0/24"}},"#));
    }

    #[test]
    fn chaining_target_and_mode_defaults_select_by_network_name() {
        let n = node(&[("10-ptp.conflist", PTP), ("20-kube-ovn.conflist", KUBE_OVN)]);
        let mut a = n.args();
        a.chaining_mode = ChainingMode::KubeOvn;
        let r = install(&a).unwrap();
        assert_eq!(r.primary.unwrap(), n.conf.join("20-kube-ovn.conflist"));
        assert_eq!(r.warnings.len(), 0, "{:?}", r.warnings);

        let mut a = n.args();
        a.chaining_target = Some("ptpnet".into());
        install(&a).unwrap();
        assert!(n.catena().contains("\"ptpnet\""));

        let mut a = n.args();
        a.chaining_target = Some("missing".into());
        let err = format!("{:#}", install(&a).unwrap_err());
        assert!(
            err.contains("\"missing\"") && err.contains("10-ptp.conflist (ptpnet)"),
            "{err}"
        );

        // A mode default that is absent falls back to the runtime pick, loudly.
        let mut a = n.args();
        a.chaining_mode = ChainingMode::Calico;
        let r = install(&a).unwrap();
        assert_eq!(r.primary.unwrap(), n.conf.join("10-ptp.conflist"));
        assert!(r.warnings[0].contains("k8s-pod-network"));
    }

    #[test]
    fn primary_that_sorts_first_is_reported() {
        // seed 004's step 4: 01-kube-ovn.conflist wins over 05-catena.conflist.
        let n = node(&[("01-kube-ovn.conflist", KUBE_OVN)]);
        let r = install(&n.args()).unwrap();
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("01-kube-ovn.conflist") && w.contains("rename")),
            "{:?}",
            r.warnings
        );
    }

    #[test]
    fn uninstall_restores_the_primary_byte_for_byte() {
        let n = node(&[
            ("10-kube-ovn.conflist", KUBE_OVN),
            (
                "99-loopback.conf",
                r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#,
            ),
        ]);
        let before = n.snapshot();
        install(&n.args()).unwrap();
        assert_ne!(before, n.snapshot());
        let r = uninstall(&n.args()).unwrap();
        assert_eq!(r.conflist.1, FileAction::Removed);
        assert_eq!(r.now_active.unwrap(), n.conf.join("10-kube-ovn.conflist"));
        assert_eq!(before, n.snapshot());
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // The binary stays unless asked: DEL of pods created chained must work.
        assert!(n.bin.join("catena-cni").exists());
        // Uninstalling again is a no-op.
        assert_eq!(uninstall(&n.args()).unwrap().conflist.1, FileAction::Absent);
        let mut a = n.args();
        a.remove_cni_binary = true;
        assert_eq!(
            uninstall(&a).unwrap().binary.unwrap().1,
            FileAction::Removed
        );
        assert!(!n.bin.join("catena-cni").exists());
    }

    #[test]
    fn exclusive_moves_others_aside_and_uninstall_moves_them_back() {
        let n = node(&[("10-kube-ovn.conflist", KUBE_OVN), ("20-ptp.conflist", PTP)]);
        let before = n.snapshot();
        let mut a = n.args();
        a.exclusive = true;
        let r = install(&a).unwrap();
        assert_eq!(r.moved_aside.len(), 2);
        let files: Vec<String> = n.snapshot().into_keys().collect();
        assert_eq!(
            files,
            [
                "05-catena.conflist",
                "10-kube-ovn.conflist.catena-bak",
                "20-ptp.conflist.catena-bak"
            ]
        );
        // A re-run (init container after a pod restart) finds the primary
        // in its backup and changes nothing.
        let snap = n.snapshot();
        let r = install(&a).unwrap();
        assert_eq!(r.conflist.unwrap().1, FileAction::Unchanged);
        assert_eq!(
            r.primary.unwrap(),
            n.conf.join("10-kube-ovn.conflist.catena-bak")
        );
        assert!(r.moved_aside.is_empty());
        assert_eq!(snap, n.snapshot());
        let r = uninstall(&a).unwrap();
        assert_eq!(r.restored.len(), 2);
        assert_eq!(before, n.snapshot());
    }

    #[test]
    fn broken_primary_fails_clearly_and_changes_nothing() {
        let n = node(&[(
            "10-broken.conflist",
            "{\"name\":\"x\",\n\"plugins\":[{\"type\":\"ptp\"},]}",
        )]);
        let before = n.snapshot();
        let err = format!("{:#}", install(&n.args()).unwrap_err());
        assert!(
            err.contains("10-broken.conflist")
                && err.contains("line 2")
                && err.contains("nothing was changed"),
            "{err}"
        );
        assert_eq!(before, n.snapshot());
        assert!(
            !n.bin.join("catena-cni").exists(),
            "binary installed although the install failed"
        );
    }

    #[test]
    fn empty_conf_dir_fails_with_a_hint() {
        let n = node(&[]);
        let err = format!("{:#}", install(&n.args()).unwrap_err());
        assert!(err.contains("install the primary CNI first"), "{err}");
    }

    #[test]
    fn custom_conf_is_written_verbatim_after_validation() {
        let n = node(&[("10-kube-ovn.conflist", KUBE_OVN)]);
        let dir = tempfile::tempdir().unwrap();
        let custom = dir.path().join("cni-config");
        let seed = r#"{
  "name": "generic-veth",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "kube-ovn", "mtu": 1400, "ipam": {"type": "kube-ovn"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "catena-cni"}
  ]
}"#;
        fs::write(&custom, seed).unwrap();
        let mut a = n.args();
        a.custom_conf = Some(custom.clone());
        let r = install(&a).unwrap();
        assert_eq!(r.primary, None);
        assert_eq!(n.catena(), seed);

        let before = n.snapshot();
        fs::write(&custom, seed.replace("catena-cni", "cilium-cni")).unwrap();
        let err = format!("{:#}", install(&a).unwrap_err());
        assert!(
            err.contains("cni.customConf")
                && err.contains("no plugin of type \"catena-cni\"")
                && err.contains("cilium-cni"),
            "{err}"
        );
        assert_eq!(before, n.snapshot());

        a.custom_conf = Some(dir.path().join("absent"));
        let err = format!("{:#}", install(&a).unwrap_err());
        assert!(err.contains("reading custom conflist"), "{err}");
    }

    #[test]
    fn conf_file_name_collisions_and_bad_names_are_refused() {
        let n = node(&[("05-catena.conflist", PTP)]);
        let err = format!("{:#}", install(&n.args()).unwrap_err());
        assert!(err.contains("is not catena's"), "{err}");
        let err = format!("{:#}", uninstall(&n.args()).unwrap_err());
        assert!(err.contains("did not write"), "{err}");
        assert_eq!(
            fs::read_to_string(n.conf.join("05-catena.conflist")).unwrap(),
            PTP
        );
        let mut a = n.args();
        a.conf_file_name = "05-catena.conf".into();
        assert!(install(&a).unwrap_err().to_string().contains(".conflist"));
    }

    #[test]
    fn mode_none_installs_only_the_binary_and_portmap_mode_checks() {
        let n = node(&[("10-ptp.conflist", PTP)]);
        let mut a = n.args();
        a.chaining_mode = ChainingMode::None;
        let r = install(&a).unwrap();
        assert_eq!(r.conflist, None);
        assert!(n.bin.join("catena-cni").exists());
        assert!(!n.conf.join(DEFAULT_CONF_FILE_NAME).exists());
        a.chaining_mode = ChainingMode::Portmap;
        let err = install(&a).unwrap_err().to_string();
        assert!(err.contains("chains no portmap"), "{err}");
        let n = node(&[("10-kube-ovn.conflist", KUBE_OVN)]);
        let mut a = n.args();
        a.chaining_mode = ChainingMode::Portmap;
        install(&a).unwrap();
    }
}
