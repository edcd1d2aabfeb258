//! assetd: stores the files ("assets") of sessions, records every change as an event in
//! a Postgres event store, and serves them over HTTP behind nginx.
//!
//! Layers, outermost first: `http` (warp filters, auth, errors, OpenAPI) calls `app`
//! (load stream → domain `handle` → append + projections in one transaction), which uses
//! the pure `domain`, the `eventstore`, the `projections` and the `blobs` store.
//! `main.rs` only parses the command line and calls `cli::run`.

pub mod app;
pub mod archive_zip;
pub mod auth;
pub mod blobs;
pub mod broker;
pub mod cli;
pub mod commands;
pub mod config;
pub mod contract;
pub mod domain;
pub mod eventstore;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod migrations;
pub mod opentera;
pub mod projections;
pub mod relay;
pub mod shutdown;
pub mod subscriber;
