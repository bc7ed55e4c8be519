//! Step 3a: the keys K (inputs of W_out at the subject's last token,
//! averaged over context templates) and the current block outputs at the
//! last edited layer.

use memit_models::{Batch, Model, Padding, TextTokenizer};

use crate::error::Result;
use crate::request::{subject_last_index, PreparedRequest};


/// Keys at `key_layer` ([n, d_ff] row-major) and block outputs at
/// `out_layer` of the plain prompts ([n, d]).
pub struct KeysAndOutputs {
    pub keys: Vec<f32>,
    pub outputs: Vec<f32>,
}

/// For each request: k = mean over groups of (mean over the group's
/// templates of the key), groups being the plain "{}" template and the
/// generated ones; the output is read from the plain prompt.
pub async fn keys_and_outputs(
    model: &Model,
    tokenizer: &TextTokenizer,
    requests: &[PreparedRequest],
    templates: &[String],
    key_layer: usize,
    out_layer: usize,
) -> Result<KeysAndOutputs> {
    let (d, d_ff) = (model.config.d_model, model.config.d_ff);
    let mut texts = Vec::new();
    for req in requests {
        for template in templates {
            let with_prompt = template.replace("{}", &req.request.prompt);
            let ids = tokenizer.encode(&with_prompt.replace("{}", &req.request.subject))?;
            let lookup = subject_last_index(&with_prompt, &req.request.subject, tokenizer)?;
            texts.push((ids, lookup));
        }
    }
    let mut key_rows = Vec::with_capacity(texts.len() * d_ff);
    let mut out_rows = Vec::with_capacity(texts.len() * d);
    let longest = texts.iter().map(|(ids, _)| ids.len()).max().unwrap_or(1).max(1);
    for chunk in texts.chunks((model.tokens_per_pass() / longest).max(1)) {
        let sequences: Vec<Vec<u32>> = chunk.iter().map(|(ids, _)| ids.clone()).collect();
        let batch = Batch::new(&sequences, Padding::Right, 0)?;
        let rows: Vec<u32> = chunk.iter().enumerate().map(|(b, (_, t))| batch.row(b, *t) as u32).collect();
        let out = model.forward(&batch, &[key_layer, out_layer], false)?;
        let keys = out.mlp_keys[key_layer].as_ref().expect("captured");
        let hidden = out.hidden[out_layer].as_ref().expect("captured");
        let rows = model.ctx.indices(&rows)?;
        let (k, h) = (model.ctx.gather_rows(keys, &rows)?, model.ctx.gather_rows(hidden, &rows)?);
        let mut read = model.ctx.read_all(&[&k, &h]).await?;
        out_rows.extend(read.pop().expect("two tensors"));
        key_rows.extend(read.pop().expect("two tensors"));
    }
    let per_request = templates.len();
    let mut keys = vec![0.0f32; requests.len() * d_ff];
    let mut outputs = vec![0.0f32; requests.len() * d];
    for i in 0..requests.len() {
        let first = i * per_request;
        let plain = &key_rows[first * d_ff..][..d_ff];
        let dst = &mut keys[i * d_ff..][..d_ff];
        if per_request == 1 {
            dst.copy_from_slice(plain);
        } else {
            let generated = per_request - 1;
            for t in 1..per_request {
                for (k, v) in dst.iter_mut().zip(&key_rows[(first + t) * d_ff..][..d_ff]) {
                    *k += v / generated as f32;
                }
            }
            for (k, v) in dst.iter_mut().zip(plain) {
                *k = 0.5 * (*k + v);
            }
        }
        outputs[i * d..][..d].copy_from_slice(&out_rows[first * d..][..d]);
    }
    Ok(KeysAndOutputs { keys, outputs })
}
