//! winmesh: an xDS control plane that brings Windows workloads into an Istio mesh through a stock Envoy
//! gateway. See docs/architecture.md for the tour.
#![forbid(unsafe_code)]

pub mod xds;
