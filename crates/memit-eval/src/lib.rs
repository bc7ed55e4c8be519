//! Evaluation of edits with the MEMIT paper's definitions (CounterFact:
//! efficacy score and magnitude, paraphrase and neighbourhood scores, their
//! harmonic mean). Probabilities of a target after a prompt are teacher
//! forced: the mean over the target's tokens of −log p.

use memit_core::{EditRequest, TargetText};
use memit_models::{Batch, Model, ModelError, Padding, TextTokenizer};
use serde::{Deserialize, Serialize};

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// One CounterFact record in MEMIT's format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterFactCase {
    pub case_id: u64,
    pub requested_rewrite: CounterFactRewrite,
    #[serde(default)]
    pub paraphrase_prompts: Vec<String>,
    #[serde(default)]
    pub neighborhood_prompts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterFactRewrite {
    pub prompt: String,
    pub subject: String,
    pub target_new: TargetText,
    pub target_true: TargetText,
}

impl CounterFactCase {
    pub fn request(&self) -> EditRequest {
        let r = &self.requested_rewrite;
        EditRequest {
            case_id: Some(self.case_id),
            prompt: r.prompt.clone(),
            subject: r.subject.clone(),
            target_new: r.target_new.clone(),
            target_true: Some(r.target_true.clone()),
        }
    }
}

fn with_space(text: &str) -> String {
    if text.starts_with(' ') { text.to_string() } else { format!(" {text}") }
}

/// Mean −log p of each target's tokens after its prompt (teacher forced),
/// for (prompt, target) pairs, batched.
pub async fn target_nll(model: &Model, tokenizer: &TextTokenizer, pairs: &[(String, String)]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(32) {
        let mut sequences = Vec::new();
        let mut spans = Vec::new();
        for (prompt, target) in chunk {
            let p = tokenizer.encode(prompt)?;
            let t = tokenizer.encode(&with_space(target))?;
            if p.is_empty() || t.is_empty() {
                return Err(ModelError::Input(format!("empty prompt or target in ({prompt:?}, {target:?})")));
            }
            spans.push((p.len(), t.clone()));
            sequences.push([p, t].concat());
        }
        let batch = Batch::new(&sequences, Padding::Right, 0)?;
        let logits = model.forward(&batch, &[], true)?.logits.expect("requested");
        let log_probs = model.ctx.softmax(&logits, true, None)?;
        // Row predicting target token j is the one holding the token before it.
        let batch = &batch;
        let rows: Vec<u32> = spans
            .iter()
            .enumerate()
            .flat_map(|(b, (plen, t))| (0..t.len()).map(move |j| batch.row(b, plen - 1 + j) as u32))
            .collect();
        let values = model.ctx.read(&model.ctx.embedding(&log_probs, &rows)?).await?;
        let vocab = model.config.vocab_size;
        let mut at = 0;
        for (_, t) in &spans {
            let nll: f32 = t.iter().enumerate().map(|(j, &id)| -values[(at + j) * vocab + id as usize]).sum::<f32>() / t.len() as f32;
            out.push(nll);
            at += t.len();
        }
    }
    Ok(out)
}

/// Per-case CounterFact outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseScore {
    pub case_id: u64,
    /// NLL(new) < NLL(true) on the rewrite prompt.
    pub efficacy: bool,
    /// P(new) − P(true) on the rewrite prompt, P = exp(−NLL).
    pub efficacy_magnitude: f32,
    /// Fraction of paraphrase prompts where new beats true.
    pub paraphrase: Option<f32>,
    /// Fraction of neighbourhood prompts where TRUE beats new.
    pub neighborhood: Option<f32>,
}

/// Aggregate scores in %, as in the paper's tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CounterFactSummary {
    pub cases: usize,
    pub efficacy_score: f32,
    pub efficacy_magnitude: f32,
    pub paraphrase_score: f32,
    pub neighborhood_score: f32,
    /// Harmonic mean of the three scores.
    pub score: f32,
}

/// Scores every case on the model as it is now.
pub async fn score_counterfact(model: &Model, tokenizer: &TextTokenizer, cases: &[CounterFactCase]) -> Result<Vec<CaseScore>> {
    let mut pairs = Vec::new();
    for c in cases {
        let r = &c.requested_rewrite;
        let rewrite = r.prompt.replace("{}", &r.subject);
        for prompt in std::iter::once(&rewrite).chain(&c.paraphrase_prompts).chain(&c.neighborhood_prompts) {
            pairs.push((prompt.clone(), r.target_new.text.clone()));
            pairs.push((prompt.clone(), r.target_true.text.clone()));
        }
    }
    let nll = target_nll(model, tokenizer, &pairs).await?;
    let mut at = 0;
    let mut scores = Vec::with_capacity(cases.len());
    for c in cases {
        let mut next = || {
            let (new, old) = (nll[at], nll[at + 1]);
            at += 2;
            (new, old)
        };
        let (new, old) = next();
        let fraction = |results: Vec<bool>| (!results.is_empty()).then(|| results.iter().filter(|&&b| b).count() as f32 / results.len() as f32);
        let paraphrase = fraction(c.paraphrase_prompts.iter().map(|_| { let (n, o) = next(); n < o }).collect());
        let neighborhood = fraction(c.neighborhood_prompts.iter().map(|_| { let (n, o) = next(); o < n }).collect());
        scores.push(CaseScore { case_id: c.case_id, efficacy: new < old, efficacy_magnitude: (-new).exp() - (-old).exp(), paraphrase, neighborhood });
    }
    Ok(scores)
}

pub fn summarize(scores: &[CaseScore]) -> CounterFactSummary {
    let n = scores.len().max(1) as f32;
    let mean = |values: Vec<f32>| if values.is_empty() { 0.0 } else { values.iter().sum::<f32>() / values.len() as f32 };
    let es = 100.0 * scores.iter().filter(|s| s.efficacy).count() as f32 / n;
    let em = 100.0 * mean(scores.iter().map(|s| s.efficacy_magnitude).collect());
    let ps = 100.0 * mean(scores.iter().filter_map(|s| s.paraphrase).collect());
    let ns = 100.0 * mean(scores.iter().filter_map(|s| s.neighborhood).collect());
    let score = if es > 0.0 && ps > 0.0 && ns > 0.0 { 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns) } else { 0.0 };
    CounterFactSummary { cases: scores.len(), efficacy_score: es, efficacy_magnitude: em, paraphrase_score: ps, neighborhood_score: ns, score }
}
