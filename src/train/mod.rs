//! Training: configuration, schedules, data-dependent initialisation, metrics, and the loop with its checkpoints.

pub mod config;
pub mod init;
pub mod liveness;
pub mod metrics;
pub mod schedule;
pub mod trainer;

pub use config::{
    Collectives, DataConfig, LambdaRamp, Parallel, PreactScope, RunConfig, TrainConfig,
};
pub use trainer::{StepReport, Trainer, resolve_checkpoint};
