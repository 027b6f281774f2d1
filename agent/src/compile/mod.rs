//! Pure functions from the model to what the datapath should hold.

pub mod selector;
pub mod services;
