//! Pure functions from the model to what the datapath should hold.

pub mod policy;
pub mod selector;
pub mod services;
