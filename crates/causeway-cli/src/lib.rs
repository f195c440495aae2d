//! The `causeway` command's parts: the supervisor behind `causeway up`, the component entry point
//! every started process runs, `status`, `token`, the demos, and the edge client they share with
//! the integration tests.

pub mod bench;
pub mod bench_proxy;
pub mod bench_queue;
pub mod component;
pub mod demo;
pub mod demo_grpc;
pub mod demo_queue;
pub mod edge;
pub mod loadgen;
pub mod queue;
pub mod soak;
pub mod state;
pub mod status;
pub mod supervisor;
