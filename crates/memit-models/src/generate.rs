//! Greedy and top-k sampled generation. Each step re-runs the prompt plus
//! the tokens so far (prompts here are short) and reads back only the
//! logits of each sequence's last token.

use crate::error::{ModelError, Result};
use crate::forward::{Batch, Padding};
use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Sample from the `k` most likely tokens at `temperature`, with a
    /// seeded generator so runs repeat.
    TopK { k: usize, temperature: f32, seed: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop a sequence once it produces the model's end-of-sequence token.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 20, sampling: Sampling::Greedy, stop_at_eos: true }
    }
}

/// xorshift64*, enough for reproducible top-k draws.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest logit (lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn sample_top_k(logits: &[f32], k: usize, temperature: f32, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let k = k.clamp(1, logits.len());
    order.select_nth_unstable_by(k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    let top = &order[..k];
    let max = top.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = top.iter().map(|&i| (((logits[i] - max) / temperature.max(1e-6)) as f64).exp()).collect();
    let mut draw = rng.uniform() * weights.iter().sum::<f64>();
    for (&i, w) in top.iter().zip(&weights) {
        draw -= w;
        if draw <= 0.0 {
            return i as u32;
        }
    }
    top[k - 1] as u32
}

impl Model {
    /// Logits of the last real token of each sequence: [batch][vocab].
    pub async fn last_token_logits(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let batch = Batch::new(sequences, Padding::Right, 0)?;
        let mut x = self.embed(&batch)?;
        for layer in 0..self.config.n_layers {
            x = self.block(layer, &x, &batch, false)?.hidden;
        }
        let last: Vec<u32> = (0..batch.batch).map(|b| batch.last_row(b) as u32).collect();
        let logits = self.logits(&self.ctx.embedding(&x, &last)?)?;
        let values = self.ctx.read(&logits).await?;
        Ok(values.chunks(self.config.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// Continues each prompt; returns only the new tokens. Keys and values
    /// are cached: each step runs one row per sequence through the model.
    pub async fn generate(&self, prompts: &[Vec<u32>], options: GenerateOptions) -> Result<Vec<Vec<u32>>> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest + options.max_new_tokens > self.config.max_positions {
            return Err(ModelError::Input(format!(
                "prompt of {longest} tokens plus {} new ones exceeds the model's {} positions",
                options.max_new_tokens, self.config.max_positions
            )));
        }
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(ModelError::Input("generation needs at least one prompt, and no empty one".into()));
        }
        let mut new_tokens = vec![Vec::new(); prompts.len()];
        if options.max_new_tokens == 0 {
            return Ok(new_tokens);
        }
        let mut rng = match options.sampling {
            Sampling::TopK { seed, .. } => Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            Sampling::Greedy => Rng(1),
        };
        // Every sequence at its final length, the new tokens' places held by
        // token 0: attention is causal, so no row sees a place after its
        // own, and each step writes its token's keys and values over the
        // placeholder's. One pass over all rows fills the cache.
        let full: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut s = p.clone();
                s.resize(p.len() + options.max_new_tokens, 0);
                s
            })
            .collect();
        let batch = Batch::new(&full, Padding::Right, 0)?;
        let last_prompt_tokens: Vec<usize> = prompts.iter().map(|p| p.len() - 1).collect();
        let mut pass = self.suffix_pass(0, &self.embed(&batch)?, &batch, &last_prompt_tokens)?;
        // Step t runs the row of each sequence's newest token (the prompt's
        // last one at t = 0) and reads the next token off its logits.
        let mut newest: Vec<u32> = prompts.iter().map(|p| p[p.len() - 1]).collect();
        let mut done = vec![false; prompts.len()];
        let vocab = self.config.vocab_size;
        for step in 0..options.max_new_tokens {
            let starts: Vec<usize> = last_prompt_tokens.iter().map(|&s| s + step).collect();
            pass = pass.moved_to(&self.ctx, &batch, &starts, 1)?;
            let x = self.run_suffix(&pass, &self.embed_suffix(&pass, &newest)?)?;
            let logits = self.ctx.read(&self.logits(&x)?).await?;
            for (i, row) in logits.chunks(vocab).enumerate() {
                if done[i] {
                    continue;
                }
                let token = match options.sampling {
                    Sampling::Greedy => argmax(row),
                    Sampling::TopK { k, temperature, .. } => sample_top_k(row, k, temperature, &mut rng),
                };
                new_tokens[i].push(token);
                newest[i] = token;
                if options.stop_at_eos && Some(token) == self.config.eos_token_id {
                    done[i] = true;
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(new_tokens)
    }
}
