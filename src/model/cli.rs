//! `clt run`: tokenise a prompt, run a model on it, show the likeliest next tokens, optionally continue it
//! greedily, and optionally dump the logits of every position as JSON.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use super::forward::softmax;
use super::{CausalLm, ForwardOptions, KvCache, continue_greedy};
use crate::{Error, Result};

/// Arguments of `clt run`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Model: a llama2.c v0 checkpoint (.bin), a GGUF file or a Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer file (default: the one inside or beside the model).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Continue the prompt greedily for this many tokens.
    #[arg(long, default_value_t = 0)]
    pub generate: usize,
    /// Write `{"token_ids": [...], "logits": [[...], ...]}` (every position, full vocabulary) to this file.
    #[arg(long)]
    pub dump_logits: Option<PathBuf>,
    /// How many of the likeliest next tokens to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
}

/// Runs `clt run`, printing to standard output.
pub fn run(args: RunArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(&args, &mut out)
}

/// Runs `clt run`, printing to `out`.
pub fn run_to(args: &RunArgs, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::io("<stdout>", e);
    let t0 = Instant::now();
    let loaded = super::load(&args.model, args.tokenizer.as_deref())?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    writeln!(
        out,
        "model: {} ({:?} {}; {} layers, d_model {}, {} heads / {} kv, vocab {}), loaded in {:.2} s",
        args.model.display(),
        loaded.format,
        model.architecture(),
        model.n_layers(),
        model.d_model(),
        model.n_heads(),
        model.n_kv_heads(),
        model.vocab_size(),
        t0.elapsed().as_secs_f64()
    )
    .map_err(io)?;
    let ids = tok.encode(&args.prompt)?;
    writeln!(out, "token ids ({}): {:?}", ids.len(), ids).map_err(io)?;
    let pieces: Vec<String> = ids.iter().map(|&i| tok.piece(i)).collect();
    writeln!(out, "pieces: {pieces:?}").map_err(io)?;
    if ids.is_empty() {
        return Err(Error::Unsupported(
            "the prompt tokenises to no tokens (this model adds no BOS token)".into(),
        ));
    }
    let t1 = Instant::now();
    // Through a cache, so that a continuation goes on from this forward.
    let mut cache = KvCache::new();
    let logits = model
        .forward_cached(&ids, &mut cache, &ForwardOptions::default())?
        .logits;
    let dt = t1.elapsed().as_secs_f64();
    writeln!(
        out,
        "forward: {} tokens in {:.3} s ({:.1} tokens/s)",
        ids.len(),
        dt,
        ids.len() as f64 / dt.max(1e-9)
    )
    .map_err(io)?;
    let v = model.vocab_size();
    let last = &logits[(ids.len() - 1) * v..];
    let probs = softmax(last);
    let mut order: Vec<usize> = (0..v).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
    writeln!(out, "top {} next tokens:", args.top.min(v)).map_err(io)?;
    for &i in order.iter().take(args.top) {
        writeln!(
            out,
            "  {:>7} {:<20} p={:.4} logit={:.4}",
            i,
            format!("{:?}", tok.piece(i as u32)),
            probs[i],
            last[i]
        )
        .map_err(io)?;
    }
    if let Some(path) = &args.dump_logits {
        let rows: Vec<&[f32]> = logits.chunks_exact(v).collect();
        let dump = serde_json::json!({ "token_ids": ids, "logits": rows });
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        let mut w = std::io::BufWriter::new(f);
        serde_json::to_writer(&mut w, &dump)
            .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
        w.flush().map_err(|e| Error::io(path, e))?;
        writeln!(out, "logits written to {}", path.display()).map_err(io)?;
    }
    if args.generate > 0 {
        let t2 = Instant::now();
        let new = continue_greedy(
            model,
            &mut cache,
            last.to_vec(),
            args.generate,
            tok.eos(),
            &ForwardOptions::default(),
        )?
        .tokens;
        let dt = t2.elapsed().as_secs_f64();
        writeln!(
            out,
            "generated {} tokens in {dt:.3} s ({:.1} tokens/s)",
            new.len(),
            new.len() as f64 / dt.max(1e-9)
        )
        .map_err(io)?;
        let all: Vec<u32> = ids.iter().chain(&new).copied().collect();
        writeln!(out, "generated ids: {new:?}").map_err(io)?;
        writeln!(out, "continuation: {}", tok.decode(&all)).map_err(io)?;
    }
    Ok(())
}
