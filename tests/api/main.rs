//! Integration tests against real Postgres (and nginx, Chromium): one binary, one module
//! per area of the contract. Every test builds its own `TestApp` (database, data dir,
//! port), so they run in parallel and can run again.

#[macro_use]
mod helpers;

mod archives;
mod assets;
mod auth;
mod bad_input;
mod blob_store;
mod commands;
mod contract;
mod database_outage;
mod error_shape;
mod eventstore;
mod hardening;
mod jobs;
mod nginx;
mod opentera;
mod opentera_archives;
mod ops;
mod relay;
mod replay;
mod s3;
mod sessions;
mod signed;
