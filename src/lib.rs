//! winmesh: an xDS control plane that brings Windows workloads into an Istio mesh through a stock Envoy
//! gateway. See docs/architecture.md for the tour.
#![forbid(unsafe_code)]

pub mod app;
pub mod assemble;
pub mod bootstrap;
pub mod config;
pub mod configdump;
pub mod debug;
pub mod demo;
pub mod discovery;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod proxyconfig;
pub mod serve;
pub mod sidecar;
pub mod status;
pub mod translate;
pub mod xds;
pub mod yamlcheck;
