//! Context templates: "{}" plus short texts the model itself generates, so
//! edits generalise beyond the exact request prompt.

use memit_models::{GenerateOptions, Model, Sampling, TextTokenizer};

use crate::error::Result;

const PREFIXES: [&str; 5] = ["The", "Therefore", "Because", "I", "You"];

/// `["{}"]` followed by one template per prefix: the prefix continued by
/// `length` tokens sampled top-5, braces removed, then ". {}".
pub async fn context_templates(model: &Model, tokenizer: &TextTokenizer, length: usize, seed: u64) -> Result<Vec<String>> {
    let mut templates = vec!["{}".to_string()];
    for (i, prefix) in PREFIXES.iter().enumerate() {
        let ids = tokenizer.encode(prefix)?;
        let options = GenerateOptions {
            max_new_tokens: length,
            sampling: Sampling::TopK { k: 5, temperature: 1.0, seed: seed.wrapping_add(i as u64) },
            stop_at_eos: false,
        };
        let new = model.generate(std::slice::from_ref(&ids), options).await?.remove(0);
        let text = tokenizer.decode(&[ids, new].concat())?;
        templates.push(format!("{}. {{}}", text.replace(['{', '}'], "")));
    }
    Ok(templates)
}
