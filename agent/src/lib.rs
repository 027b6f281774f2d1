//! The agent as a library, so its pure parts (sources, compilers) are testable
//! without a kernel. Data flows sources -> model -> compile -> datapath; the API
//! feeds endpoints into the model.

pub mod adopt;
pub mod api;
pub mod cgroup;
pub mod compile;
pub mod config;
pub mod core;
pub mod daemon;
pub mod install;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod nodeport;
pub mod ops;
pub mod report;
pub mod sources;
pub mod state_file;
