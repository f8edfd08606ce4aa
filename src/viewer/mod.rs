//! The web viewer: attribution graphs and feature dashboards in one self-contained page (`clt serve`).
//!
//! - [`server`]: the HTTP routes (axum) over a graphs folder and a features file, and interventions on a
//!   graph's features when it has the model and transcoder;
//! - [`subgraph`]: a graph's pinned nodes and supernodes (`qParams`) checked and saved into its file;
//! - [`paths`]: file names from clients resolved strictly inside the served folder;
//! - [`assets`]: the page (HTML, vanilla JavaScript drawing SVG, CSS), embedded with `include_str!`;
//! - [`cli`]: `clt serve` as library code.
//!
//! `docs/viewer.md` describes the routes and the page.

pub mod assets;
pub mod cli;
pub mod paths;
pub mod server;
pub mod subgraph;

pub use server::{InterveneSource, ServeConfig, Server, start};
