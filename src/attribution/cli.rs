//! `clt attribute` (a prompt's attribution graph, pruned, as the frontend's JSON plus the raw adjacency),
//! `clt intervene` (the replacement model with features set or scaled: the new top logits) and `clt
//! activations` (which features fire where on a prompt, and how well the transcoder fits it).

use std::path::{Path, PathBuf};

use super::activations::{activations_json, parse_feature, prompt_activations};
use super::graph::{AttributionConfig, Graph, LogitTarget, attribute};
use super::intervene::{Edit, InterventionResult, Mode, intervene_and_generate};
use super::output::{display_token, graph_json, write_json, write_raw};
use super::{ReplacementTranscoder, Scores, load_transcoder, prune, scores};
use crate::cache::InputHook;
use crate::model::{LoadedModel, Tokenizer, softmax_top};
use crate::{Error, Result};

/// Where the model and transcoder come from (every command of this module).
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// The model (llama2.c `.bin`, GGUF or a Hugging Face directory).
    #[arg(long)]
    pub model: PathBuf,
    /// Its tokenizer, when not stored with or beside the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The transcoder: a circuit-tracer directory (config.yaml) or one of our checkpoints or run directories.
    #[arg(long)]
    pub transcoder: PathBuf,
    /// The hook the transcoder reads (default: from its config.yaml or its training cache).
    #[arg(long, value_enum)]
    pub input_hook: Option<InputHook>,
}

impl ModelArgs {
    /// The model and transcoder (as [`load_replacement`]) and the transcoder's name.
    pub fn load(&self) -> Result<(LoadedModel, ReplacementTranscoder, String)> {
        load_replacement(
            &self.model,
            self.tokenizer.as_deref(),
            &self.transcoder,
            self.input_hook,
        )
    }
}

/// The model, the transcoder and a prompt (`attribute`, `intervene`, `activations`).
#[derive(clap::Args, Clone, Debug)]
pub struct Inputs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// The prompt (a special token is put first when the tokens do not start with one: the model's BOS, else
    /// its EOS, as circuit-tracer does).
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// A file holding the prompt instead (UTF-8; one final line break, `\n` or `\r\n`, is not part of it):
    /// for long prompts.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
}

impl Inputs {
    /// The model and transcoder (as [`load_replacement`]) and the transcoder's name.
    pub fn load(&self) -> Result<(LoadedModel, ReplacementTranscoder, String)> {
        self.source.load()
    }

    /// The prompt's text: `--prompt`, or `--prompt-file`'s contents less one final line break.
    pub fn prompt_text(&self) -> Result<String> {
        match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => {
                let bytes = std::fs::read(f).map_err(|e| crate::Error::io(f, e))?;
                let mut text = String::from_utf8(bytes).map_err(|e| crate::Error::Format {
                    path: f.clone(),
                    offset: e.utf8_error().valid_up_to() as u64,
                    reason: "the prompt file is not UTF-8".into(),
                })?;
                for end in ["\r\n", "\n"] {
                    if text.ends_with(end) {
                        text.truncate(text.len() - end.len());
                        break;
                    }
                }
                Ok(text)
            }
            (None, None) => Err(crate::Error::config(
                "prompt",
                "give --prompt or --prompt-file",
            )),
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct AttributeArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// The graph JSON to write (circuit-tracer's frontend format); the raw adjacency goes beside it as
    /// `<stem>.graph.safetensors`. With `--prompts`, the folder the graphs go into.
    #[arg(long)]
    pub out: PathBuf,
    /// The graph's name in the JSON (default: the file stem).
    #[arg(long)]
    pub slug: Option<String>,
    #[arg(long, default_value_t = 10)]
    pub max_n_logits: usize,
    #[arg(long, default_value_t = 0.95)]
    pub desired_logit_prob: f64,
    /// Most feature nodes (explored by influence when fewer than the active features).
    #[arg(long, default_value_t = 7500)]
    pub max_feature_nodes: usize,
    /// Feature rows per ranking batch.
    #[arg(long, default_value_t = 512)]
    pub batch_size: usize,
    /// Ranking batches between influence updates.
    #[arg(long, default_value_t = 4)]
    pub update_interval: usize,
    #[arg(long, default_value_t = 0.8)]
    pub node_threshold: f64,
    #[arg(long, default_value_t = 0.98)]
    pub edge_threshold: f64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Attribute this token's logit instead of the top ones (repeatable; circuit-tracer's
    /// `attribution_targets`): `#ID`, or its text as the tokenizer reads it alone (it must be one token;
    /// llama2.c and SentencePiece tokenizers put a space before it).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Many prompts, one graph each, written into the folder `--out` as `<slug>.json` with a
    /// `summary.jsonl` (the model and transcoder loaded once): JSON lines `{"prompt": "...", "slug"?: "..."}`
    /// where the file ends in `.jsonl`, else one prompt per non-empty line.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file", "slug"])]
    pub prompts: Option<PathBuf>,
    /// Attribute `logit(target) − logit(versus)` instead (a logit difference), each `--versus` paired with
    /// the `--target` in the same place.
    #[arg(long = "versus", requires = "targets")]
    pub versus: Vec<String>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct IntervenArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// `LAYER:POS:FEATURE=VALUE` sets a feature's activation (0 silences it, a negative value flips it, a
    /// value where it is inactive steers); `LAYER:POS:FEATURE*=FACTOR` scales it; `POS` may be `*` (every
    /// position after the first, the generated ones included).
    #[arg(long = "set", required = true)]
    pub edits: Vec<String>,
    /// Top logits to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Also generate this many tokens greedily, without and with the edits, and print both continuations.
    #[arg(long, default_value_t = 0)]
    pub generate: usize,
    /// What runs around the edits: `frozen-attention` (circuit-tracer's default: the model's MLPs plus the
    /// edited features' changes, attention patterns frozen), `live` (the same, attention recomputed),
    /// `replacement` (every feature recomputed, clean error nodes), `direct` (direct effects only: the
    /// attribution graph's linear model).
    #[arg(long, value_enum, default_value_t = Mode::FrozenAttention)]
    pub mode: Mode,
    /// Also write the result as JSON: the prompt's tokens, the mode and edits, the top logits before and
    /// after, and the continuations with each chosen token's probability.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also show this token's probability and logit before and after (repeatable): `#ID`, or a text the
    /// tokenizer reads alone as one token (as `clt attribute --target`).
    #[arg(long = "watch")]
    pub watch: Vec<String>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ActivationsArgs {
    #[command(flatten)]
    pub inputs: Inputs,
    /// The strongest features listed at each position (over all layers, by activation).
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Follow this feature over every position, its pre-activation and activation (repeatable):
    /// `LAYER:FEATURE`.
    #[arg(long = "feature")]
    pub features: Vec<String>,
    /// A features directory (`clt features --out`) whose labels (`clt explain`) name the features shown.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Also write the result as JSON: tokens, each layer's fit, the strongest features at each position,
    /// the traces, and every active feature (layer, position, feature, activation); with `--prompts`, a
    /// JSON line per prompt.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Many prompts (as `clt attribute --prompts` reads them): a line each, with where each `--feature`
    /// fires most.
    #[arg(long, conflicts_with_all = ["prompt", "prompt_file"])]
    pub prompts: Option<PathBuf>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct SpliceArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// The text to score on (files as `clt cache` reads them), cut into contexts as `clt cache` cuts it.
    #[arg(long, num_args = 1.., required = true)]
    pub corpus: Vec<PathBuf>,
    /// The JSON field or Parquet/Arrow column holding each document.
    #[arg(long)]
    pub column: Option<String>,
    /// Documents at the corpus's start left out: text the transcoder was not trained on (the number a
    /// training store's `clt cache` printed).
    #[arg(long, default_value_t = 0)]
    pub skip_documents: u64,
    /// Tokens per context, the special token first.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Stop after the context that brings the predictions scored to this many.
    #[arg(long, default_value_t = 8192)]
    pub tokens: u64,
    /// Also splice each layer alone (one more forward per layer and context).
    #[arg(long)]
    pub per_layer: bool,
    /// Also write the report as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// `clt splice`: the transcoder spliced into the model, scored on a corpus ([`super::splice`]).
pub fn run_splice(args: &SpliceArgs) -> Result<super::splice::SpliceReport> {
    let (m, tc, name) = args.source.load()?;
    let contexts = crate::cache::corpus_contexts(
        &m,
        &args.corpus,
        args.column.clone(),
        args.skip_documents,
        args.context,
    )?;
    let contexts = super::splice::first_predictions(contexts, args.tokens);
    // A progress line, rewritten at most twice a second, on a terminal only.
    use std::io::IsTerminal;
    let show = !args.quiet && std::io::stderr().is_terminal();
    let (t0, mut shown) = (std::time::Instant::now(), 0.0);
    let r = super::splice::splice_eval(&m.model, &tc, contexts, args.per_layer, |r| {
        let t = t0.elapsed().as_secs_f64();
        if show && t - shown >= 0.5 {
            shown = t;
            eprint!(
                "\r{} contexts, {} predictions, {t:.1} s   ",
                r.contexts, r.model.n
            );
        }
    })?;
    if show {
        eprintln!();
    }
    if r.model.n == 0 {
        return Err(Error::config(
            "corpus",
            "no context of three tokens or more to score".to_string(),
        ));
    }
    println!("{}", splice_table(&r, &name));
    if let Some(path) = &args.json {
        let mut v = r.to_json();
        v["transcoder"] = serde_json::json!(name);
        v["context"] = serde_json::json!(args.context);
        write_file(path, format!("{v:#}\n").as_bytes())?;
    }
    Ok(r)
}

/// `clt splice`'s printed report.
pub fn splice_table(r: &super::splice::SpliceReport, name: &str) -> String {
    let mut out = format!(
        "{name} spliced into the model: {} predictions over {} contexts\n\
         {:<28} {:>9} {:>10} {:>8}\n",
        r.model.n, r.contexts, "", "CE (nats)", "KL", "top-1"
    );
    for (what, s) in [
        ("model", &r.model),
        ("transcoder spliced in", &r.spliced),
        ("MLPs zero-ablated", &r.zero),
    ] {
        out += &format!(
            "{what:<28} {:>9.4} {:>10.5} {:>8.4}\n",
            s.mean_ce(),
            s.mean_kl(),
            s.top1_agreement()
        );
    }
    out += &format!("loss recovered: {:.4}", r.loss_recovered());
    for (l, s) in r.per_layer.iter().enumerate() {
        out += &format!(
            "\n  layer {l:>2} alone: CE {:.4} (+{:.4}), KL {:.5}, top-1 {:.4}",
            s.mean_ce(),
            s.mean_ce() - r.model.mean_ce(),
            s.mean_kl(),
            s.top1_agreement()
        );
    }
    out
}

/// The model, the transcoder, its name, the prompt and its tokens.
fn open(inputs: &Inputs) -> Result<(LoadedModel, ReplacementTranscoder, String, String, Vec<u32>)> {
    let prompt = inputs.prompt_text()?;
    let (m, tc, name) = inputs.load()?;
    let tokens = m.tokenizer.encode_prompt(&prompt)?;
    Ok((m, tc, name, prompt, tokens))
}

/// The logit targets `--target` and `--versus` name (none: the top tokens).
fn logit_targets(
    tok: &Tokenizer,
    targets: &[String],
    versus: &[String],
) -> Result<Vec<LogitTarget>> {
    if !versus.is_empty() && versus.len() != targets.len() {
        return Err(Error::config(
            "versus",
            format!(
                "{} --versus for {} --target: give one for each target, or none",
                versus.len(),
                targets.len()
            ),
        ));
    }
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let a = tok.single_token(t)?;
            match versus.get(i) {
                Some(v) => Ok(LogitTarget::Difference(a, tok.single_token(v)?)),
                None => Ok(LogitTarget::Token(a)),
            }
        })
        .collect()
}

/// The model and the transcoder attribution and interventions run with (its output hook checked against
/// the model), and the transcoder's name.
pub fn load_replacement(
    model: &Path,
    tokenizer: Option<&Path>,
    transcoder: &Path,
    input_hook: Option<InputHook>,
) -> Result<(LoadedModel, ReplacementTranscoder, String)> {
    let m = crate::model::load(model, tokenizer)?;
    let lt = load_transcoder(transcoder, input_hook, m.model.norm())?;
    if let Some((hook, yaml)) = &lt.output_hook {
        super::check_output_hook(hook, m.model.post_mlp_norm(), yaml)?;
    }
    let tc = ReplacementTranscoder::new(&lt.transcoder, lt.input_hook)?;
    Ok((m, tc, lt.name))
}

/// `clt attribute`.
pub fn run_attribute(args: &AttributeArgs) -> Result<()> {
    if args.prompts.is_some() {
        return run_attribute_many(args);
    }
    let (m, tc, name, prompt, tokens) = open(&args.inputs)?;
    let cfg = attribution_config(args, &m.tokenizer)?;
    let g = attribute(&m.model, &tc, &tokens, &cfg)?;
    let slug = args.slug.clone().unwrap_or_else(|| {
        args.out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "graph".into())
    });
    let w = write_graph(
        &g,
        &m.tokenizer,
        &prompt,
        &args.out,
        &slug,
        &name,
        args.node_threshold,
        args.edge_threshold,
    )?;
    println!(
        "{} tokens, {} active features, {} feature nodes, {} logit targets",
        g.tokens.len(),
        g.active.len(),
        g.selected.len(),
        g.logit_tokens.len()
    );
    println!(
        "time: forward {:.2}s, logit rows {:.2}s, feature rows {:.2}s, ranking {:.2}s, pruning {:.2}s",
        g.timings.forward,
        g.timings.logit_rows,
        g.timings.feature_rows,
        g.timings.ranking,
        w.prune_seconds
    );
    println!(
        "replacement score {:.4}, completeness score {:.4}",
        w.scores.replacement, w.scores.completeness
    );
    println!(
        "pruned graph: {} nodes, {} links -> {}",
        w.nodes,
        w.links,
        args.out.display()
    );
    println!("raw adjacency -> {}", w.raw.display());
    Ok(())
}

/// A prompt of `--prompts` and the name of its graph.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedPrompt {
    pub slug: String,
    pub prompt: String,
}

/// Reads a `--prompts` file: JSON lines `{"prompt", "slug"?}` for a `.jsonl` file, else one prompt per
/// non-empty line (trailing `\r` dropped). Prompts without a slug are named `NNN-first-words` (their
/// 1-based line number and up to five words of the prompt, lower-cased, letters and digits only). Errors
/// name the file and line: a bad line, an empty prompt, a slug that is not a plain file name, or one used
/// twice.
pub fn read_prompts(path: &Path) -> Result<Vec<NamedPrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    // The error names the line and its first byte.
    let bad = |line: usize, at: usize, reason: String| Error::Format {
        path: path.to_path_buf(),
        offset: at as u64,
        reason: format!("line {line}: {reason}"),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        prompt: String,
        #[serde(default)]
        slug: Option<String>,
    }
    let mut out: Vec<NamedPrompt> = Vec::new();
    let mut at = 0;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let (n, start) = (i + 1, at);
        at += raw.len();
        let bad = |reason: String| bad(n, start, reason);
        let line = raw.strip_suffix('\n').unwrap_or(raw);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let (prompt, slug) = if jsonl {
            let l: Line = serde_json::from_str(line)
                .map_err(|e| bad(format!("not a {{\"prompt\", \"slug\"?}} object: {e}")))?;
            (l.prompt, l.slug)
        } else {
            (line.to_string(), None)
        };
        if prompt.is_empty() {
            return Err(bad("an empty prompt".into()));
        }
        let slug = match slug {
            Some(s) => {
                let plain = !s.is_empty()
                    && !s.starts_with('.')
                    && s.chars().all(|c| c.is_alphanumeric() || "-_ .".contains(c));
                if !plain {
                    return Err(bad(format!(
                        "slug {s:?} is not a plain file name (letters, digits, - _ . and spaces)"
                    )));
                }
                s
            }
            None => default_slug(n, &prompt),
        };
        if out.iter().any(|p| p.slug == slug) {
            return Err(bad(format!("slug {slug:?} is used twice")));
        }
        out.push(NamedPrompt { slug, prompt });
    }
    if out.is_empty() {
        return Err(bad(0, 0, "no prompts".into()));
    }
    Ok(out)
}

/// `NNN-first-words` for the prompt on line `line`.
fn default_slug(line: usize, prompt: &str) -> String {
    let words: Vec<String> = prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(5)
        .map(str::to_lowercase)
        .collect();
    if words.is_empty() {
        format!("{line:03}")
    } else {
        format!("{line:03}-{}", words.join("-"))
    }
}

/// `clt attribute --prompts`: every prompt's graph into the folder `--out`, one line each in
/// `summary.jsonl` (its scores and sizes, or the error that stopped it); a prompt that fails does not stop
/// the others, and the command fails at the end naming how many did.
fn run_attribute_many(args: &AttributeArgs) -> Result<()> {
    let file = args.prompts.as_deref().unwrap_or(Path::new(""));
    let prompts = read_prompts(file)?;
    let (m, tc, name) = args.inputs.load()?;
    let cfg = attribution_config(args, &m.tokenizer)?;
    let dir = &args.out;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let summary_path = dir.join("summary.jsonl");
    let one = |p: &NamedPrompt| -> Result<serde_json::Value> {
        let t0 = std::time::Instant::now();
        let out = dir.join(format!("{}.json", p.slug));
        let tokens = m.tokenizer.encode_prompt(&p.prompt)?;
        let g = attribute(&m.model, &tc, &tokens, &cfg)?;
        let w = write_graph(
            &g,
            &m.tokenizer,
            &p.prompt,
            &out,
            &p.slug,
            &name,
            args.node_threshold,
            args.edge_threshold,
        )?;
        println!(
            "{}: {} tokens, {} feature nodes, replacement {:.4}, completeness {:.4}, {} nodes, {} \
                     links, {:.2} s -> {}",
            p.slug,
            g.tokens.len(),
            g.selected.len(),
            w.scores.replacement,
            w.scores.completeness,
            w.nodes,
            w.links,
            t0.elapsed().as_secs_f64(),
            out.display()
        );
        Ok(serde_json::json!({
            "graph": format!("{}.json", p.slug),
            "tokens": g.tokens.len(), "feature_nodes": g.selected.len(),
            "replacement_score": w.scores.replacement, "completeness_score": w.scores.completeness,
            "nodes": w.nodes, "links": w.links, "seconds": t0.elapsed().as_secs_f64(),
        }))
    };
    // The summary is rewritten after every prompt, so that a run stopped part-way records what it finished.
    let (_, failed) = for_each_prompt(&prompts, one, |lines| {
        crate::clt::checkpoint::write_atomic(&summary_path, lines.as_bytes())
    })?;
    println!(
        "{} of {} graphs -> {} (summary.jsonl)",
        prompts.len() - failed.len(),
        prompts.len(),
        dir.display()
    );
    let more = format!(
        "; their errors are in {}",
        dir.join("summary.jsonl").display()
    );
    all_ran(&failed, prompts.len(), &more)
}

/// The attribution settings of `args` (the targets printed).
fn attribution_config(args: &AttributeArgs, tok: &Tokenizer) -> Result<AttributionConfig> {
    let cfg = AttributionConfig {
        max_n_logits: args.max_n_logits,
        desired_logit_prob: args.desired_logit_prob,
        max_feature_nodes: Some(args.max_feature_nodes),
        batch_size: args.batch_size,
        update_interval: args.update_interval,
        progress: !args.quiet,
        targets: logit_targets(tok, &args.targets, &args.versus)?,
        ..AttributionConfig::default()
    };
    for t in &cfg.targets {
        let piece = |t: u32| format!("{:?} (#{t})", tok.piece(t));
        match *t {
            LogitTarget::Token(a) => println!("target: the logit of {}", piece(a)),
            LogitTarget::Difference(a, b) => {
                println!(
                    "target: the logit of {} minus that of {}",
                    piece(a),
                    piece(b)
                )
            }
        }
    }
    Ok(cfg)
}

/// What [`write_graph`] wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub json: PathBuf,
    pub raw: PathBuf,
    pub scores: Scores,
    pub nodes: usize,
    pub links: usize,
    pub prune_seconds: f64,
}

/// Prunes and scores `g`, writes the frontend JSON to `out` and the raw adjacency beside it
/// (`<stem>.graph.safetensors`).
pub fn write_graph(
    g: &Graph,
    tokenizer: &Tokenizer,
    prompt: &str,
    out: &Path,
    slug: &str,
    scan: &str,
    node_threshold: f64,
    edge_threshold: f64,
) -> Result<Written> {
    let t0 = std::time::Instant::now();
    let p = prune(&g.adjacency, &g.logit_probs, node_threshold, edge_threshold)?;
    let s = scores(&g.adjacency, &g.logit_probs)?;
    let prune_seconds = t0.elapsed().as_secs_f64();
    let j = graph_json(g, &p, &s, tokenizer, slug, scan, prompt, node_threshold);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_json(out, &j)?;
    let raw = out.with_extension("graph.safetensors");
    write_raw(&raw, g, prompt)?;
    Ok(Written {
        json: out.to_path_buf(),
        raw,
        scores: s,
        nodes: j.nodes.len(),
        links: j.links.len(),
        prune_seconds,
    })
}

/// `clt intervene`.
pub fn run_intervene(args: &IntervenArgs) -> Result<()> {
    let (m, tc, _, _, tokens) = open(&args.inputs)?;
    let edits: Vec<Edit> = args
        .edits
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_>>()?;
    let watch: Vec<u32> = args
        .watch
        .iter()
        .map(|w| m.tokenizer.single_token(w))
        .collect::<Result<_>>()?;
    let r = intervene_and_generate(
        &m.model,
        &tc,
        &tokens,
        &edits,
        args.mode,
        args.generate,
        m.tokenizer.eos(),
    )?;
    let show = |title: &str, logits: &[f32]| {
        println!("{title}");
        for (t, p) in softmax_top(logits, args.top) {
            println!(
                "  {:>8.4}  {:>7} {:?}",
                p,
                t,
                display_token(&m.tokenizer.decode(&[t as u32]))
            );
        }
    };
    show("clean:", &r.clean_logits);
    show("with the edits:", &r.logits);
    if !watch.is_empty() {
        println!("watched (clean -> with the edits):");
        for w in watched(&m.tokenizer, &watch, &r) {
            println!(
                "  {:>7} {:<16} p {:.4} -> {:.4}, logit {:.3} -> {:.3}",
                w.token,
                format!("{:?}", display_token(&w.text)),
                w.clean_prob,
                w.prob,
                w.clean_logit,
                w.logit
            );
        }
    }
    if args.generate > 0 {
        let text = |ids: &[u32]| m.tokenizer.decode(ids);
        println!("clean continuation: {:?}", text(&r.clean_continuation));
        println!("continuation with the edits: {:?}", text(&r.continuation));
    }
    if let Some(path) = &args.json {
        let j = intervention_json(
            &m.tokenizer,
            &tokens,
            args.mode,
            &args.edits,
            args.top,
            &watch,
            &r,
        );
        write_record(path, "intervention JSON", &j)?;
        println!("-> {}", path.display());
    }
    Ok(())
}

/// Writes a command's JSON record to `path` (its directory made), atomically.
fn write_record(path: &Path, what: &str, j: &serde_json::Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(j).map_err(|e| Error::InvalidData {
        what: what.into(),
        reason: e.to_string(),
    })?;
    write_file(path, &bytes)
}

/// Writes `bytes` to `path` (its directory made), atomically.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::clt::checkpoint::write_atomic(path, bytes)
}

/// `clt activations`.
pub fn run_activations(args: &ActivationsArgs) -> Result<()> {
    let i = &args.inputs;
    let prompts = match &args.prompts {
        Some(file) => read_prompts(file)?,
        None => vec![NamedPrompt {
            slug: String::new(),
            prompt: i.prompt_text()?,
        }],
    };
    let (m, tc, _) = i.load()?;
    let watch: Vec<(usize, usize)> = args
        .features
        .iter()
        .map(|s| parse_feature(s, &tc))
        .collect::<Result<_>>()?;
    let labels = match &args.labels {
        Some(dir) if !dir.is_dir() => {
            return Err(Error::config(
                "labels",
                format!("{} is not a features directory", dir.display()),
            ));
        }
        Some(dir) => Some(crate::features::labels::Labels::read(dir)?),
        None => None,
    };
    if args.prompts.is_some() {
        return activations_many(args, &prompts, &m, &tc, &watch, labels.as_ref());
    }
    let tokens = m.tokenizer.encode_prompt(&prompts[0].prompt)?;
    let pa = prompt_activations(&m.model, &tc, &tokens, &watch)?;
    let tok = &m.tokenizer;
    let piece = |p: usize| format!("{:?}", display_token(&tok.piece(tokens[p])));
    let named = |l: usize, f: usize| match labels.as_ref().and_then(|ls| ls.get(l, f)) {
        Some(text) => format!("{l}:{f} {text:?}"),
        None => format!("{l}:{f}"),
    };
    println!(
        "{} tokens; position 0 ({}) keeps no features",
        tokens.len(),
        piece(0)
    );
    println!("layer      L0      NMSE  error share");
    for (l, fit) in pa.layers.iter().enumerate() {
        println!(
            "{l:>5} {:>7.1} {:>9.4} {:>12.4}",
            fit.l0, fit.nmse, fit.error_share
        );
    }
    if args.top > 0 {
        println!("position  token             strongest features (layer:feature activation)");
        let af = &pa.features;
        for p in 1..tokens.len() {
            let list: Vec<String> = pa
                .top_at(p, args.top)
                .into_iter()
                .map(|i| {
                    let (l, f) = (af.layer[i] as usize, af.index[i] as usize);
                    format!("{} {:.3}", named(l, f), af.value[i])
                })
                .collect();
            println!("{p:>8}  {:<16}  {}", piece(p), list.join(", "));
        }
    }
    for t in &pa.traces {
        let fired: Vec<usize> = (0..tokens.len())
            .filter(|&p| t.activation[p] > 0.0)
            .collect();
        println!(
            "feature {} (θ {:.4}): fires at {} of {} positions",
            named(t.layer, t.feature),
            t.threshold,
            fired.len(),
            tokens.len() - 1
        );
        println!("  position  token                  pre  activation");
        for p in 1..tokens.len() {
            let act = if t.activation[p] > 0.0 {
                format!("{:>11.4} *", t.activation[p])
            } else {
                String::new()
            };
            println!("  {p:>8}  {:<16} {:>9.4} {act}", piece(p), t.pre[p]);
        }
    }
    if let Some(path) = &args.json {
        let j = activations_json(tok, &pa, args.top, labels.as_ref(), true);
        write_record(path, "activations JSON", &j)?;
        println!("-> {}", path.display());
    }
    Ok(())
}

/// `clt activations --prompts`: a line per prompt (its tokens, mean L0 and error share over the layers, and
/// where each traced feature fires most), and with `--json` a JSON line each (the single prompt's record
/// with every active feature, plus `slug` and `prompt`; or the error). A prompt that fails does not stop the
/// others; the command then fails naming them.
fn activations_many(
    args: &ActivationsArgs,
    prompts: &[NamedPrompt],
    m: &LoadedModel,
    tc: &ReplacementTranscoder,
    watch: &[(usize, usize)],
    labels: Option<&crate::features::labels::Labels>,
) -> Result<()> {
    let tok = &m.tokenizer;
    let one = |p: &NamedPrompt| -> Result<serde_json::Value> {
        let tokens = tok.encode_prompt(&p.prompt)?;
        let pa = prompt_activations(&m.model, tc, &tokens, watch)?;
        let n_l = pa.layers.len().max(1) as f64;
        let l0 = pa.layers.iter().map(|f| f.l0).sum::<f64>() / n_l;
        let share = pa.layers.iter().map(|f| f.error_share).sum::<f64>() / n_l;
        println!(
            "{}: {} tokens, L0 {l0:.1} a layer, error share {share:.4} (mean over layers)",
            p.slug,
            tokens.len()
        );
        for t in &pa.traces {
            let (at, most) = t
                .activation
                .iter()
                .enumerate()
                .fold((0, 0.0f32), |b, (i, &a)| if a > b.1 { (i, a) } else { b });
            let name = format!("{}:{}", t.layer, t.feature);
            if most > 0.0 {
                let fired = t.activation.iter().filter(|&&a| a > 0.0).count();
                println!(
                    "  {name} fires at {fired} of {} positions, most {most:.4} at {at} {:?}",
                    tokens.len() - 1,
                    display_token(&tok.piece(tokens[at]))
                );
            } else {
                let top = t
                    .pre
                    .iter()
                    .skip(1)
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                println!(
                    "  {name} silent (pre-activation at most {top:.4}, θ {:.4})",
                    t.threshold
                );
            }
        }
        Ok(activations_json(tok, &pa, args.top, labels, true))
    };
    let (lines, failed) = for_each_prompt(prompts, one, |_| Ok(()))?;
    if let Some(path) = &args.json {
        write_file(path, lines.as_bytes())?;
        println!("-> {} (a JSON line per prompt)", path.display());
    }
    all_ran(&failed, prompts.len(), "")
}

/// Runs `one` on every prompt, each giving its JSON line (`slug` and `prompt` added), or failing: then the
/// failure is printed and its line is `{"slug", "prompt", "error"}`, and the other prompts run on. `after`
/// sees the lines so far after each prompt. Returns the lines and the slugs of the prompts that failed.
fn for_each_prompt(
    prompts: &[NamedPrompt],
    mut one: impl FnMut(&NamedPrompt) -> Result<serde_json::Value>,
    mut after: impl FnMut(&str) -> Result<()>,
) -> Result<(String, Vec<String>)> {
    let (mut lines, mut failed) = (String::new(), Vec::new());
    for p in prompts {
        let mut j = one(p).unwrap_or_else(|e| {
            eprintln!("{}: failed: {e}", p.slug);
            failed.push(p.slug.clone());
            serde_json::json!({ "error": e.to_string() })
        });
        j["slug"] = p.slug.clone().into();
        j["prompt"] = p.prompt.clone().into();
        lines.push_str(&j.to_string());
        lines.push('\n');
        after(&lines)?;
    }
    Ok((lines, failed))
}

/// Ok when no prompt of `n` failed, else an error naming the ones that did (`more`: where to read why).
fn all_ran(failed: &[String], n: usize, more: &str) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        "prompts",
        format!(
            "{} of {n} prompts failed ({}){more}",
            failed.len(),
            failed.join(", ")
        ),
    ))
}

/// A watched token's probability and logit before and after an intervention.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Watched {
    pub token: u32,
    pub text: String,
    pub clean_prob: f32,
    pub prob: f32,
    pub clean_logit: f32,
    pub logit: f32,
}

/// The `watch` tokens' probabilities and logits in `r`, before and after.
pub fn watched(tok: &Tokenizer, watch: &[u32], r: &InterventionResult) -> Vec<Watched> {
    let (pc, pe) = (
        crate::model::forward::softmax(&r.clean_logits),
        crate::model::forward::softmax(&r.logits),
    );
    watch
        .iter()
        .map(|&t| {
            let i = t as usize;
            Watched {
                token: t,
                text: tok.decode(&[t]),
                clean_prob: pc[i],
                prob: pe[i],
                clean_logit: r.clean_logits[i],
                logit: r.logits[i],
            }
        })
        .collect()
}

/// The record of an intervention (`clt intervene --json`, the viewer's `/api/intervene`): the prompt's
/// tokens and pieces, the mode and edits, the `top` logits before and after, the `watch` tokens', both
/// continuations.
pub fn intervention_json(
    tok: &Tokenizer,
    tokens: &[u32],
    mode: Mode,
    edits: &[String],
    top: usize,
    watch: &[u32],
    r: &InterventionResult,
) -> serde_json::Value {
    use serde_json::json;
    let top = |logits: &[f32]| -> Vec<serde_json::Value> {
        softmax_top(logits, top)
            .into_iter()
            .map(|(t, p)| json!({"token": t, "text": tok.decode(&[t as u32]), "prob": p, "logit": logits[t]}))
            .collect()
    };
    let vocab = r.logits.len().max(1);
    // The probability each continuation token had at its step (with the edits).
    let probs: Vec<f32> = r
        .step_logits
        .chunks_exact(vocab)
        .zip(&r.continuation)
        .map(|(l, &t)| crate::model::forward::softmax(l)[t as usize])
        .collect();
    let mode = clap::ValueEnum::to_possible_value(&mode).map(|v| v.get_name().to_string());
    json!({
        "tokens": tokens,
        "pieces": tokens.iter().map(|&t| tok.piece(t)).collect::<Vec<_>>(),
        "mode": mode,
        "edits": edits,
        "clean_top": top(&r.clean_logits),
        "top": top(&r.logits),
        "watch": watched(tok, watch, r),
        "clean_continuation": {"tokens": r.clean_continuation, "text": tok.decode(&r.clean_continuation)},
        "continuation": {
            "tokens": r.continuation,
            "text": tok.decode(&r.continuation),
            "probs": probs,
        },
    })
}
