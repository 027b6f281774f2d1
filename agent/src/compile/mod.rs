//! Pure functions from the model to what the datapath should hold.

pub mod external;
pub mod maglev;
pub mod policy;
pub mod selector;
pub mod services;
pub mod traffic_policy;
