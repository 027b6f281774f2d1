//! Expedited RCU grace periods while catena attaches or detaches TCX links.
//!
//! Why: the kernel creates (and releases) a TCX link under `rtnl_lock` and
//! then waits for a normal RCU grace period (`synchronize_rcu`, the mprog
//! a/b entry swap). On a busy node that wait is 10-30 ms per link, two links
//! per pod, serialised across pods by `rtnl_lock`: nearly all of what catena
//! adds to a CNI ADD. With `/sys/kernel/rcu_expedited` set the same attach
//! takes ~0.1 ms (measured on 6.18: p50 20 ms -> 0.1 ms).
//!
//! The knob is node-wide, so catena only holds it while at least one of its
//! own attaches or detaches is in flight (a counted guard, like the kernel's
//! own `rcu_expedite_gp()` nesting), and only if it found the knob at `0`:
//! a node where someone else enabled it is left alone. A marker file in the
//! state dir records "catena set it"; an agent that died while holding it
//! restores `0` at its next start ([`RcuExpedite::recover`]).
//!
//! The cost while held is IPIs to busy CPUs for every grace period anyone
//! on the node waits for, for the milliseconds an attach takes. Operators
//! with isolated (`nohz_full`) CPUs can turn it off (`--expedite-attach=false`).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{debug, info, warn};

/// The kernel's switch (`rcupdate.rcu_expedited` at runtime).
pub const KNOB: &str = "/sys/kernel/rcu_expedited";

#[derive(Debug)]
pub struct RcuExpedite {
    knob: PathBuf,
    marker: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Attaches/detaches in flight.
    active: usize,
    /// We wrote `1` and owe the knob a `0`.
    we_set_it: bool,
    /// The knob cannot be written (read-only /sys in an unprivileged
    /// container): stop trying, it was said once in the log.
    unavailable: bool,
}

/// Held for the duration of one attach or detach.
#[must_use]
pub struct ExpediteGuard<'a> {
    owner: &'a RcuExpedite,
}

impl RcuExpedite {
    /// `marker_dir`: where the "catena set it" marker lives (the state dir).
    pub fn new(knob: impl Into<PathBuf>, marker_dir: &Path) -> RcuExpedite {
        RcuExpedite {
            knob: knob.into(),
            marker: marker_dir.join("rcu-expedited.set"),
            state: Mutex::new(State::default()),
        }
    }

    /// Undoes what a previous agent left behind when it died holding the
    /// knob. Call once at start, before any attach.
    pub fn recover(&self) {
        if !self.marker.exists() {
            return;
        }
        match fs::write(&self.knob, "0") {
            Ok(()) => {
                info!(knob = %self.knob.display(), "restored rcu_expedited=0 left by a previous agent")
            }
            Err(e) => warn!(knob = %self.knob.display(), error = %e, "restoring rcu_expedited"),
        }
        let _ = fs::remove_file(&self.marker);
    }

    pub fn hold(&self) -> ExpediteGuard<'_> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.active += 1;
        if st.active == 1 && !st.unavailable {
            match self.enable() {
                Ok(set) => st.we_set_it = set,
                Err(e) => {
                    st.unavailable = true;
                    warn!(knob = %self.knob.display(), error = %e,
                        "cannot expedite RCU for attaches; each TCX attach waits a full grace period");
                }
            }
        }
        ExpediteGuard { owner: self }
    }

    /// Sets the knob to 1 if it is 0; returns whether we changed it.
    fn enable(&self) -> io::Result<bool> {
        let current = fs::read_to_string(&self.knob)?;
        if current.trim() != "0" {
            return Ok(false);
        }
        // Marker first: a crash between the two leaves a marker for a knob
        // still at 0, which `recover` handles harmlessly.
        if let Err(e) = fs::write(&self.marker, b"") {
            debug!(marker = %self.marker.display(), error = %e, "no rcu marker (state dir?)");
        }
        fs::write(&self.knob, "1")?;
        Ok(true)
    }

    fn release(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.active -= 1;
        if st.active == 0 && st.we_set_it {
            st.we_set_it = false;
            if let Err(e) = fs::write(&self.knob, "0") {
                warn!(knob = %self.knob.display(), error = %e, "restoring rcu_expedited=0");
                return;
            }
            let _ = fs::remove_file(&self.marker);
        }
    }

    #[cfg(test)]
    fn active(&self) -> usize {
        self.state.lock().unwrap().active
    }
}

impl Drop for ExpediteGuard<'_> {
    fn drop(&mut self) {
        self.owner.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(initial: &str) -> (tempfile::TempDir, RcuExpedite) {
        let dir = tempfile::tempdir().unwrap();
        let knob = dir.path().join("knob");
        fs::write(&knob, initial).unwrap();
        let r = RcuExpedite::new(&knob, dir.path());
        (dir, r)
    }

    fn knob(dir: &tempfile::TempDir) -> String {
        fs::read_to_string(dir.path().join("knob")).unwrap()
    }

    #[test]
    fn held_while_any_guard_lives_then_restored() {
        let (dir, r) = fixture("0\n");
        let a = r.hold();
        assert_eq!(knob(&dir), "1");
        assert!(dir.path().join("rcu-expedited.set").exists());
        let b = r.hold();
        drop(a);
        assert_eq!(knob(&dir), "1", "still one attach in flight");
        drop(b);
        assert_eq!(knob(&dir), "0");
        assert!(!dir.path().join("rcu-expedited.set").exists());
        assert_eq!(r.active(), 0);
    }

    #[test]
    fn someone_elses_setting_is_left_alone() {
        let (dir, r) = fixture("1\n");
        drop(r.hold());
        assert_eq!(knob(&dir), "1\n");
        assert!(!dir.path().join("rcu-expedited.set").exists());
    }

    #[test]
    fn a_dead_agents_setting_is_restored_at_start() {
        let (dir, r) = fixture("1");
        fs::write(dir.path().join("rcu-expedited.set"), b"").unwrap();
        r.recover();
        assert_eq!(knob(&dir), "0");
        assert!(!dir.path().join("rcu-expedited.set").exists());
    }

    #[test]
    fn an_unwritable_knob_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = RcuExpedite::new(dir.path().join("missing/knob"), dir.path());
        drop(r.hold());
        drop(r.hold());
        assert_eq!(r.active(), 0);
    }
}
