//! `clt explain`: a short label per feature from its top contexts, asked of an OpenAI-compatible
//! chat-completions endpoint, stored as `labels.json` beside the features file (the viewer shows them).
//!
//! Nothing is sent anywhere unless the user names the endpoint (`--url`) and the model (`--model-name`). Only
//! the features' example texts are sent; the API key, if any, is read from an environment variable and never
//! printed. Labels are saved every few features, so an interrupted run resumes where it stopped (features
//! that already have a label are skipped unless `--overwrite`).

use super::cli::FEATURES_FILE;
use super::labels::Labels;
use super::{FeatureFile, FeatureRecord};
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `clt explain`.
#[derive(clap::Args, Clone, Debug)]
pub struct ExplainArgs {
    /// The features directory written by `clt features` (labels.json is written there).
    #[arg(long)]
    pub features: PathBuf,
    /// Base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1); `/chat/completions` is appended
    /// unless the URL already ends with it.
    #[arg(long)]
    pub url: String,
    /// The model name sent in each request.
    #[arg(long)]
    pub model_name: String,
    /// Environment variable holding the API key, sent as a bearer token when set.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// Only these layers (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Label at most this many features.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Top examples shown per feature.
    #[arg(long, default_value_t = 8)]
    pub examples: usize,
    /// Ask again for features that already have a label.
    #[arg(long)]
    pub overwrite: bool,
    /// Seconds to wait for one answer.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

const SYSTEM: &str = "You label features of a language model. You are shown text excerpts on which one feature \
activates; in each, the token where it activates most is wrapped in [[ ]]. Answer with a short label (at most 8 \
words) for what the feature responds to, and nothing else.";

/// The user message for one feature: its top examples, the chosen token marked.
pub fn prompt(rec: &FeatureRecord, n_examples: usize) -> String {
    let mut s = String::from("Excerpts, strongest first:\n");
    let top = rec
        .examples_quantiles
        .first()
        .map_or(&[][..], |q| &q.examples[..]);
    for (i, ex) in top.iter().take(n_examples).enumerate() {
        let text: String = ex
            .tokens
            .iter()
            .enumerate()
            .map(|(j, t)| {
                if j == ex.train_token_ind {
                    format!("[[{t}]]")
                } else {
                    t.clone()
                }
            })
            .collect();
        s.push_str(&format!("{}. {}\n", i + 1, text.replace('\n', "\\n")));
    }
    if !rec.top_logits.is_empty() {
        s.push_str(&format!(
            "Tokens it promotes as output: {}\n",
            rec.top_logits.join(" | ")
        ));
    }
    s
}

/// The endpoint's chat-completions URL.
fn endpoint(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/chat/completions") {
        u.to_string()
    } else {
        format!("{u}/chat/completions")
    }
}

/// A label from an answer: its first non-empty line, without quotes, at most 120 characters.
fn clean(answer: &str) -> String {
    let line = answer
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let line = line
        .trim_matches(|c| c == '"' || c == '\'' || c == '`')
        .trim();
    line.chars().take(120).collect()
}

/// Runs `clt explain`; returns the number of features labelled now.
pub fn run(args: &ExplainArgs) -> Result<usize> {
    let file = FeatureFile::open(args.features.join(FEATURES_FILE))?;
    let mut labels = Labels::read(&args.features)?;
    let url = endpoint(&args.url);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::config(
            "explain.url",
            format!("{url} is not an http(s) URL"),
        ));
    }
    let key = std::env::var(&args.api_key_env)
        .ok()
        .filter(|k| !k.is_empty());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(args.timeout)))
        .http_status_as_error(false)
        .build()
        .into();
    let remote = |reason: String| Error::Remote {
        url: url.clone(),
        reason,
    };
    let layers: Vec<usize> = if args.layers.is_empty() {
        (0..file.n_layers()).collect()
    } else {
        args.layers.clone()
    };
    let mut done = 0usize;
    'outer: for &l in &layers {
        for f in 0..file.n_features() {
            if args.limit.is_some_and(|n| done >= n) {
                break 'outer;
            }
            if !args.overwrite && labels.get(l, f).is_some() {
                continue;
            }
            let rec = file.get(l, f)?;
            if rec.n_active == 0 {
                continue;
            }
            let body = serde_json::json!({
                "model": args.model_name,
                "temperature": 0,
                "max_tokens": 40,
                "messages": [
                    { "role": "system", "content": SYSTEM },
                    { "role": "user", "content": prompt(&rec, args.examples) },
                ],
            });
            let mut req = agent.post(&url);
            if let Some(k) = &key {
                req = req.header("Authorization", &format!("Bearer {k}"));
            }
            let mut resp = req.send_json(&body).map_err(|e| remote(e.to_string()))?;
            let status = resp.status();
            let text = resp
                .body_mut()
                .read_to_string()
                .map_err(|e| remote(format!("reading the answer: {e}")))?;
            if !status.is_success() {
                let snippet: String = text.chars().take(300).collect();
                return Err(remote(format!("HTTP {status}: {snippet}")));
            }
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| remote(format!("answer is not JSON: {e}")))?;
            let content = v["choices"][0]["message"]["content"]
                .as_str()
                .ok_or_else(|| remote("answer has no choices[0].message.content".into()))?;
            labels.insert(l, f, clean(content));
            done += 1;
            if done.is_multiple_of(16) {
                labels.write(&args.features)?;
            }
        }
    }
    labels.write(&args.features)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_and_cleaning() {
        assert_eq!(endpoint("http://h:1/v1/"), "http://h:1/v1/chat/completions");
        assert_eq!(
            endpoint("http://h/v1/chat/completions"),
            "http://h/v1/chat/completions"
        );
        assert_eq!(clean("\n  \"Plural nouns\"\nmore"), "Plural nouns");
        assert_eq!(clean(&"x".repeat(500)).len(), 120);
    }
}
