//! catena-cni: the chained CNI plugin that hands pods to catena-agent.
//!
//! The runtime runs it after a primary plugin (ptp, bridge, Calico, flannel,
//! kube-ovn...) has made the pod's veth and addresses. catena-cni changes no
//! addresses, routes or rules: it finds the host veth and registers it, and
//! the agent attaches the eBPF programs.

pub mod agent;
pub mod args;
pub mod cmd_add;
pub mod cmd_check;
pub mod cmd_del;
pub mod cmd_gc;
pub mod cmd_status;
pub mod config;
pub mod env;
pub mod error;
pub mod log;
pub mod netlink;
pub mod queue;
pub mod result;
pub mod version;
pub mod veth;

use config::NetConf;
use env::{CniEnv, Command};
use error::{CniError, Code};
use std::io::{Read, Write};

/// Runs one CNI invocation; returns the process exit status.
pub fn run(env: Result<CniEnv, CniError>, stdin: &mut impl Read, stdout: &mut impl Write) -> i32 {
    let env = match env {
        Ok(env) => env,
        Err(e) => return fail(stdout, &e, version::LATEST),
    };
    let mut input = Vec::new();
    if let Err(e) = stdin.read_to_end(&mut input) {
        if env.command != Command::Del {
            let e = CniError::new(Code::Io, "cannot read the network configuration from stdin")
                .with_details(e.to_string());
            return fail(stdout, &e, version::LATEST);
        }
        input.clear();
    }
    // Errors are reported in the configuration's version when we speak it.
    let reply_version = config::peek_version(&input)
        .filter(|v| version::is_supported(v))
        .unwrap_or_else(|| version::LATEST.to_string());

    let conf = NetConf::parse(&input);
    if let Ok(c) = &conf {
        log::use_file(c.log_file.as_deref());
    }
    let outcome: Result<Option<String>, CniError> = match env.command {
        Command::Version => Ok(Some(version::version_info(
            config::peek_version(&input).as_deref(),
        ))),
        Command::Del => {
            cmd_del::run(&env, conf);
            Ok(None)
        }
        Command::Add => conf.and_then(|c| cmd_add::run(&env, &c)).map(Some),
        Command::Check => conf.and_then(|c| cmd_check::run(&env, &c)).map(|()| None),
        Command::Status => conf.and_then(|c| cmd_status::run(&c)).map(|()| None),
        Command::Gc => conf.and_then(|c| cmd_gc::run(&c)).map(|()| None),
    };
    match outcome {
        Ok(out) => {
            if let Some(out) = out {
                if let Err(e) = stdout
                    .write_all(out.as_bytes())
                    .and_then(|()| stdout.flush())
                {
                    diag!("cannot write the result to stdout: {e}");
                    return 1;
                }
            }
            0
        }
        Err(e) => {
            diag!(
                "{:?} {}/{}: {e}",
                env.command,
                env.container_id.as_deref().unwrap_or("-"),
                env.ifname.as_deref().unwrap_or("-")
            );
            fail(stdout, &e, &reply_version)
        }
    }
}

fn fail(stdout: &mut impl Write, e: &CniError, cni_version: &str) -> i32 {
    let _ = stdout.write_all(e.to_json(cni_version).as_bytes());
    let _ = stdout.flush();
    1
}
