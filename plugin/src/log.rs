//! Diagnostics: stderr, or the configuration's `logFile`. Never stdout, which
//! carries only the result or the error object.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

static LOG_FILE: Mutex<Option<File>> = Mutex::new(None);

/// Sends further diagnostics to `path` (appending). If it cannot be opened,
/// that is said on stderr and stderr stays the sink.
pub fn use_file(path: Option<&Path>) {
    let Some(path) = path else { return };
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => *LOG_FILE.lock().unwrap_or_else(|e| e.into_inner()) = Some(f),
        Err(e) => eprintln!("catena-cni: cannot open logFile {path:?}: {e}"),
    }
}

pub fn write(args: std::fmt::Arguments<'_>) {
    let mut sink = LOG_FILE.lock().unwrap_or_else(|e| e.into_inner());
    match sink.as_mut() {
        Some(f) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let _ = writeln!(
                f,
                "{}.{:03} catena-cni[{}]: {args}",
                now.as_secs(),
                now.subsec_millis(),
                std::process::id()
            );
        }
        None => eprintln!("catena-cni: {args}"),
    }
}

#[macro_export]
macro_rules! diag {
    ($($t:tt)*) => { $crate::log::write(format_args!($($t)*)) };
}
