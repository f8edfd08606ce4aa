//! Feature dashboards: what each transcoder feature responds to and what it does.
//!
//! - [`analysis`]: one ordered streaming pass over an activation store: top-k activating windows, samples from
//!   lower quantiles, firing density, activation histogram;
//! - [`logits`]: logit effects (a decoder direction through the unembedding);
//! - [`record`]: one feature's dashboard record (circuit-tracer's per-feature JSON layout, extended);
//! - [`file`](mod@file): the indexed features file the viewer reads feature by feature (`docs/viewer.md`);
//! - [`labels`]: short labels per feature (`labels.json`), shown by the viewer;
//! - [`explain`]: `clt explain`, labels asked of an OpenAI-compatible endpoint;
//! - [`cli`]: `clt features` as library code.
//!
//! ```no_run
//! # fn main() -> clt::Result<()> {
//! let file = clt::features::FeatureFile::open("runs/features/features.cltf")?;
//! let rec = file.get(2, 17)?; // layer 2, feature 17
//! println!("{} fires on {:.3}% of tokens", rec.index, 100.0 * rec.activation_frequency);
//! # Ok(())
//! # }
//! ```

pub mod analysis;
pub mod cli;
pub mod explain;
pub mod file;
pub mod labels;
pub mod logits;
pub mod record;

pub use file::{FeatureFile, FeatureFileWriter, FeaturesMeta};
pub use record::{Example, ExamplesQuantile, FeatureRecord, cantor};
