//! Text ↔ token ids through the `tokenizers` crate (the same code, and so
//! the same ids, natively and in the browser).

use crate::error::{ModelError, Result};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Parses the contents of a Hugging Face `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<TextTokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| ModelError::Tokenizer(unparsable_tokenizer(bytes, &e.to_string())))?;
        Ok(TextTokenizer { inner })
    }

    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> TextTokenizer {
        TextTokenizer { inner }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: &std::path::Path) -> Result<TextTokenizer> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        Self::from_json_bytes(&bytes)
    }

    /// Token ids of `text`, without special tokens (MEMIT prompts carry none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let encoding = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Why a tokenizer.json did not parse, naming the component this build's
/// tokenizers crate cannot handle (an unknown normalizer, pre-tokeniser,
/// model, post-processor or decoder type) where that is the cause.
fn unparsable_tokenizer(bytes: &[u8], error: &str) -> String {
    use tokenizers::{DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return format!("cannot parse tokenizer.json: {error}");
    };
    let parses = |key: &str, value: &serde_json::Value| -> bool {
        let v = value.clone();
        match key {
            "normalizer" => serde_json::from_value::<NormalizerWrapper>(v).is_ok(),
            "pre_tokenizer" => serde_json::from_value::<PreTokenizerWrapper>(v).is_ok(),
            "model" => serde_json::from_value::<ModelWrapper>(v).is_ok(),
            "post_processor" => serde_json::from_value::<PostProcessorWrapper>(v).is_ok(),
            _ => serde_json::from_value::<DecoderWrapper>(v).is_ok(),
        }
    };
    for key in ["normalizer", "pre_tokenizer", "model", "post_processor", "decoder"] {
        let Some(value) = json.get(key).filter(|v| !v.is_null()) else { continue };
        if parses(key, value) {
            continue;
        }
        // In a Sequence, name the member that fails.
        let members = value.get("pretokenizers").or_else(|| value.get("normalizers")).or_else(|| value.get("decoders")).or_else(|| value.get("processors")).and_then(|m| m.as_array());
        let culprit = members.and_then(|m| m.iter().find(|m| !parses(key, m))).unwrap_or(value);
        let kind = culprit.get("type").and_then(|t| t.as_str()).unwrap_or("(no type)");
        return format!(
            "tokenizer.json's {key} `{kind}` is not supported by the tokenizers library this build uses (0.22); convert the tokenizer with a recent `tokenizers` release or use the model's GGUF ({error})"
        );
    }
    format!("cannot parse tokenizer.json: {error}")
}