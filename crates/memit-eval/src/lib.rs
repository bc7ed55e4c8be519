//! Evaluation of edits with the MEMIT paper's definitions (CounterFact:
//! efficacy score and magnitude, paraphrase and neighbourhood scores, their
//! harmonic mean). Probabilities of a target after a prompt are teacher
//! forced: the mean over the target's tokens of −log p. zsRE: teacher-forced
//! token accuracy. Fluency: n-gram entropy of generated text.

use memit_core::{EditRequest, TargetText};
use memit_models::{argmax, Batch, GenerateOptions, Model, ModelError, Padding, Sampling, TextTokenizer};
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
    /// Prompts for the fluency test (the full CounterFact has them; the
    /// MEMIT-like copy here does not).
    #[serde(default)]
    pub generation_prompts: Vec<String>,
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

/// How well the model predicts one target after its prompt, teacher forced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TargetFit {
    /// Mean over the target's tokens of −log p.
    pub nll: f32,
    /// Fraction of the target's tokens that are the argmax given the
    /// prompt and the target tokens before them.
    pub token_accuracy: f32,
}

/// Teacher-forced NLL and token accuracy of each (prompt, target) pair;
/// targets get a leading space as MEMIT tokenises them. Batched.
pub async fn target_fits(model: &Model, tokenizer: &TextTokenizer, pairs: &[(String, String)]) -> Result<Vec<TargetFit>> {
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
            let (mut nll, mut hits) = (0.0f32, 0usize);
            for (j, &id) in t.iter().enumerate() {
                let row = &values[(at + j) * vocab..(at + j + 1) * vocab];
                nll -= row[id as usize];
                hits += (argmax(row) == id) as usize;
            }
            out.push(TargetFit { nll: nll / t.len() as f32, token_accuracy: hits as f32 / t.len() as f32 });
            at += t.len();
        }
    }
    Ok(out)
}

/// Mean −log p of each target's tokens after its prompt (teacher forced).
pub async fn target_nll(model: &Model, tokenizer: &TextTokenizer, pairs: &[(String, String)]) -> Result<Vec<f32>> {
    Ok(target_fits(model, tokenizer, pairs).await?.into_iter().map(|f| f.nll).collect())
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
    /// Mean P(new) − P(true) over the paraphrase prompts.
    pub paraphrase_magnitude: Option<f32>,
    /// Fraction of neighbourhood prompts where TRUE beats new.
    pub neighborhood: Option<f32>,
    /// Mean P(true) − P(new) over the neighbourhood prompts.
    pub neighborhood_magnitude: Option<f32>,
}

/// Aggregate scores in %, as in the paper's tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CounterFactSummary {
    pub cases: usize,
    pub efficacy_score: f32,
    pub efficacy_magnitude: f32,
    pub paraphrase_score: f32,
    /// Paraphrase magnitude PM: mean P(new) − P(true), ×100.
    pub paraphrase_magnitude: f32,
    pub neighborhood_score: f32,
    /// Neighbourhood magnitude NM: mean P(true) − P(new), ×100.
    pub neighborhood_magnitude: f32,
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
        let fraction = |results: &[(f32, f32)], wins: fn(f32, f32) -> bool| (!results.is_empty()).then(|| results.iter().filter(|&&(n, o)| wins(n, o)).count() as f32 / results.len() as f32);
        let magnitude = |results: &[(f32, f32)], sign: f32| (!results.is_empty()).then(|| results.iter().map(|&(n, o)| sign * ((-n).exp() - (-o).exp())).sum::<f32>() / results.len() as f32);
        let paraphrases: Vec<(f32, f32)> = c.paraphrase_prompts.iter().map(|_| next()).collect();
        let neighbours: Vec<(f32, f32)> = c.neighborhood_prompts.iter().map(|_| next()).collect();
        scores.push(CaseScore {
            case_id: c.case_id,
            efficacy: new < old,
            efficacy_magnitude: (-new).exp() - (-old).exp(),
            paraphrase: fraction(&paraphrases, |n, o| n < o),
            paraphrase_magnitude: magnitude(&paraphrases, 1.0),
            neighborhood: fraction(&neighbours, |n, o| o < n),
            neighborhood_magnitude: magnitude(&neighbours, -1.0),
        });
    }
    Ok(scores)
}

pub fn summarize(scores: &[CaseScore]) -> CounterFactSummary {
    let n = scores.len().max(1) as f32;
    let mean = |values: Vec<f32>| if values.is_empty() { 0.0 } else { values.iter().sum::<f32>() / values.len() as f32 };
    let es = 100.0 * scores.iter().filter(|s| s.efficacy).count() as f32 / n;
    let em = 100.0 * mean(scores.iter().map(|s| s.efficacy_magnitude).collect());
    let ps = 100.0 * mean(scores.iter().filter_map(|s| s.paraphrase).collect());
    let pm = 100.0 * mean(scores.iter().filter_map(|s| s.paraphrase_magnitude).collect());
    let ns = 100.0 * mean(scores.iter().filter_map(|s| s.neighborhood).collect());
    let nm = 100.0 * mean(scores.iter().filter_map(|s| s.neighborhood_magnitude).collect());
    let score = if es > 0.0 && ps > 0.0 && ns > 0.0 { 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns) } else { 0.0 };
    CounterFactSummary { cases: scores.len(), efficacy_score: es, efficacy_magnitude: em, paraphrase_score: ps, paraphrase_magnitude: pm, neighborhood_score: ns, neighborhood_magnitude: nm, score }
}

/// Entropy (bits) of the n-gram frequency distribution of `words`.
fn ngram_entropy(words: &[String], n: usize) -> f64 {
    let mut counts: std::collections::HashMap<&[String], usize> = std::collections::HashMap::new();
    for gram in words.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    let total = counts.values().sum::<usize>() as f64;
    counts.values().map(|&c| c as f64 / total).map(|p| -p * p.log2()).sum()
}

/// The MEMIT paper's fluency measure of one text, in bits: bigram and
/// trigram entropies weighted 2/3 and 4/3 and averaged (the paper's tables
/// show it ×100). Words as nltk's `word_tokenize` splits them, case kept:
/// runs of letters and digits, each punctuation mark, and clitics split off
/// ("John's" → John 's, "don't" → do n't).
pub fn generation_entropy(text: &str) -> f64 {
    let words = split_words(text);
    let weights = [(2, 2.0 / 3.0), (3, 4.0 / 3.0)];
    weights.iter().map(|&(n, w)| w * ngram_entropy(&words, n)).sum::<f64>() / weights.len() as f64
}

fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch.is_alphanumeric() {
            word.push(ch);
            continue;
        }
        let clitic = ch == '\'' && !word.is_empty();
        if clitic {
            // "don't": the n goes with the clitic.
            let n_t = word.ends_with('n') && word.len() > 1 && chars.peek() == Some(&'t');
            let tail = if n_t { word.pop().map(String::from).unwrap_or_default() } else { String::new() };
            words.push(std::mem::take(&mut word));
            word = tail;
            word.push(ch);
            continue;
        }
        if !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        if !ch.is_whitespace() {
            words.push(ch.to_string());
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Mean generation entropy of top-k (k = 5, seeded) continuations of
/// `prompts`, `max_new_tokens` each; the prompt is part of the text scored,
/// as in the paper. A prompt too long for the model's context is continued
/// from its last tokens (the whole prompt is still scored).
pub async fn mean_generation_entropy(model: &Model, tokenizer: &TextTokenizer, prompts: &[String], max_new_tokens: usize, seed: u64) -> Result<f64> {
    let context = model.config.max_positions;
    let max_new_tokens = max_new_tokens.min(context / 2);
    let mut total = 0.0;
    for chunk in prompts.chunks(16) {
        let ids = chunk
            .iter()
            .map(|p| tokenizer.encode(p).map(|ids| ids[ids.len().saturating_sub(context - max_new_tokens)..].to_vec()))
            .collect::<Result<Vec<_>>>()?;
        let options = GenerateOptions { max_new_tokens, sampling: Sampling::TopK { k: 5, temperature: 1.0, seed }, stop_at_eos: false };
        for (prompt, new) in chunk.iter().zip(model.generate(&ids, options).await?) {
            total += generation_entropy(&format!("{prompt}{}", tokenizer.decode(&new)?));
        }
    }
    Ok(total / prompts.len().max(1) as f64)
}

/// One zsRE record (MEND's format, as used by MEMIT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZsreRecord {
    pub subject: String,
    /// The question, containing the subject.
    pub src: String,
    pub rephrase: String,
    /// The new answer the edit teaches.
    pub alt: String,
    #[serde(default)]
    pub answers: Vec<String>,
    /// An unrelated question and its answer, for specificity.
    pub loc: String,
    pub loc_ans: String,
}

/// The answer a zsRE edit teaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZsreTarget {
    /// `answers[0]`, as the MEMIT and AlphaEdit authors' code does.
    Answer,
    /// The record's `alt`, MEND's counterfactual answer.
    Alt,
}

impl ZsreRecord {
    /// The answer the edit teaches (None when the record has no answers).
    pub fn target(&self, which: ZsreTarget) -> Option<&str> {
        match which {
            ZsreTarget::Answer => self.answers.first().map(String::as_str),
            ZsreTarget::Alt => Some(&self.alt),
        }
    }

    /// MEMIT's request for this record: the question with the subject as
    /// `{}`, the chosen answer as target. None when the subject is not in
    /// the question or the answer is missing.
    pub fn request(&self, case_id: u64, which: ZsreTarget) -> Option<EditRequest> {
        let target = self.target(which)?;
        self.src.contains(&self.subject).then(|| EditRequest {
            case_id: Some(case_id),
            prompt: self.src.replacen(&self.subject, "{}", 1),
            subject: self.subject.clone(),
            target_new: TargetText { text: target.to_string() },
            target_true: None,
        })
    }

    /// The specificity prompt as the authors score it: the unrelated
    /// question followed by "?".
    pub fn locality_prompt(&self) -> String {
        format!("{}?", self.loc)
    }
}

/// Per-record zsRE token accuracies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZsreScore {
    pub efficacy: f32,
    pub paraphrase: f32,
    pub specificity: f32,
}

/// zsRE means in %, as in the paper's tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZsreSummary {
    pub cases: usize,
    pub efficacy: f32,
    pub paraphrase: f32,
    pub specificity: f32,
}

/// Token accuracy of the taught answer after the question and after its
/// rephrasing, and of the unrelated answer after the unrelated question
/// (with "?"), teacher forced, as in the authors' zsRE evaluation.
pub async fn score_zsre(model: &Model, tokenizer: &TextTokenizer, records: &[ZsreRecord], which: ZsreTarget) -> Result<Vec<ZsreScore>> {
    let mut pairs = Vec::new();
    for r in records {
        let target = r.target(which).ok_or_else(|| ModelError::Input(format!("zsRE record about {:?} has no answers", r.subject)))?;
        pairs.push((r.src.clone(), target.to_string()));
        pairs.push((r.rephrase.clone(), target.to_string()));
        pairs.push((r.locality_prompt(), r.loc_ans.clone()));
    }
    let fits = target_fits(model, tokenizer, &pairs).await?;
    Ok(fits.chunks_exact(3).map(|f| ZsreScore { efficacy: f[0].token_accuracy, paraphrase: f[1].token_accuracy, specificity: f[2].token_accuracy }).collect())
}

pub fn summarize_zsre(scores: &[ZsreScore]) -> ZsreSummary {
    let mean = |f: fn(&ZsreScore) -> f32| 100.0 * scores.iter().map(f).sum::<f32>() / scores.len().max(1) as f32;
    ZsreSummary { cases: scores.len(), efficacy: mean(|s| s.efficacy), paraphrase: mean(|s| s.paraphrase), specificity: mean(|s| s.specificity) }
}
