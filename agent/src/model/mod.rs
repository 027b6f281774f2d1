//! The agent's own model: endpoints registered by the CNI plugin and the
//! node-local identities of their label sets.

pub mod endpoints;
pub mod identity;
pub mod policy;
