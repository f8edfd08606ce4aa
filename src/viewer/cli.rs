//! `clt serve` as library code.

use super::server::{InterveneSource, ServeConfig, start};
use crate::Result;
use std::path::PathBuf;

/// Arguments of `clt serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Folder of attribution-graph JSON files (circuit-tracer's format).
    #[arg(long)]
    pub graphs: PathBuf,
    /// Features directory written by `clt features` (or its features.cltf).
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// Port (0: any free one).
    #[arg(long, default_value_t = 8041)]
    pub port: u16,
    /// Address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The model the graphs were made with: with `--transcoder`, the page can run interventions on a
    /// graph's features (as `clt intervene`).
    #[arg(long, requires = "transcoder")]
    pub model: Option<PathBuf>,
    /// The model's tokenizer, when not stored with or beside it.
    #[arg(long, requires = "model")]
    pub tokenizer: Option<PathBuf>,
    /// The transcoder the graphs were made with (with `--model`).
    #[arg(long, requires = "model")]
    pub transcoder: Option<PathBuf>,
}

/// Serves until the process is stopped.
pub fn run(args: &ServeArgs) -> Result<()> {
    let server = start(&ServeConfig {
        graphs: args.graphs.clone(),
        features: args.features.clone(),
        host: args.host.clone(),
        port: args.port,
        intervene: match (&args.model, &args.transcoder) {
            (Some(model), Some(transcoder)) => Some(InterveneSource {
                model: model.clone(),
                tokenizer: args.tokenizer.clone(),
                transcoder: transcoder.clone(),
            }),
            _ => None,
        },
    })?;
    println!("viewer on {} (Ctrl-C to stop)", server.url());
    server.wait();
    Ok(())
}
