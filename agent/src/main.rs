//! `catena-agent`: the node agent. Loads and pins the datapath, serves the agent
//! API to the CNI plugin and the CLI, and keeps the eBPF maps in line with the
//! cluster state from its source (a manifest directory or Kubernetes).

use anyhow::Result;
use catena_agent::config::{AgentConfig, Command, LogFormat};
use clap::Parser;

fn main() -> Result<()> {
    catena_agent::memory::tune_allocator();
    let config = AgentConfig::parse_from(normalize_args(std::env::args_os()));
    init_tracing(config.log_format);
    match &config.command {
        Some(Command::InstallCni(args)) => {
            println!("{}", catena_agent::install::install(args)?);
            return Ok(());
        }
        Some(Command::UninstallCni(args)) => {
            println!("{}", catena_agent::install::uninstall(args)?);
            return Ok(());
        }
        Some(Command::Uninstall(args)) => {
            println!("{}", catena_agent::ops::uninstall::uninstall(args)?);
            return Ok(());
        }
        None => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(catena_agent::daemon::run(config))
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `catena-agent --uninstall [flags]` is the spelling operators (and Cilium's
/// habit) reach for; it means the `uninstall` subcommand with the same flags.
fn normalize_args(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.collect();
    if let Some(i) = args.iter().position(|a| a == "--uninstall") {
        args.remove(i);
        args.insert(1.min(args.len()), "uninstall".into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uninstall_flag_means_the_subcommand() {
        let argv = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let parsed = AgentConfig::parse_from(normalize_args(
            argv(&["catena-agent", "--state-dir", "/tmp/s", "--uninstall"]).into_iter(),
        ));
        match parsed.command {
            Some(Command::Uninstall(a)) => {
                assert_eq!(a.state_dir, std::path::PathBuf::from("/tmp/s"))
            }
            _ => panic!("--uninstall did not select the uninstall subcommand"),
        }
        let plain = AgentConfig::parse_from(normalize_args(argv(&["catena-agent"]).into_iter()));
        assert!(plain.command.is_none());
    }
}
