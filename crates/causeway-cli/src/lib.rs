//! The `causeway` command's parts: the supervisor behind `causeway up`, the component entry point
//! every started process runs, `status`, `token`, the demos, and the edge client they share with
//! the integration tests.

pub mod component;
pub mod demo;
pub mod edge;
pub mod state;
pub mod status;
pub mod supervisor;
