//! Edit requests in MEMIT's JSON format (and EasyEdit's, read into it).

use serde::{Deserialize, Serialize};

use crate::error::{MemitError, Result};
use memit_models::TextTokenizer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetText {
    #[serde(rename = "str")]
    pub text: String,
}

/// `{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
///   "target_new": {"str": "English"}}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_id: Option<u64>,
    pub prompt: String,
    pub subject: String,
    pub target_new: TargetText,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_true: Option<TargetText>,
}

/// A request checked and tokenised for one model.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedRequest {
    pub request: EditRequest,
    /// The new object with its leading space, as the model should emit it.
    pub target_text: String,
    pub target_ids: Vec<u32>,
}

impl EditRequest {
    /// Checks the request's shape and tokenises its target (`index` names it
    /// in errors).
    pub fn prepare(&self, index: usize, tokenizer: &TextTokenizer) -> Result<PreparedRequest> {
        let fail = |detail: String| MemitError::Request { index, detail };
        if self.prompt.matches("{}").count() != 1 {
            let hint = if !self.subject.is_empty() && self.prompt.contains(&self.subject) { " (it contains the subject itself: replace it with {})" } else { "" };
            return Err(fail(format!("prompt {:?} must contain exactly one {{}} where the subject goes{hint}", self.prompt)));
        }
        if self.subject.trim().is_empty() {
            return Err(fail("subject is empty".into()));
        }
        if self.target_new.text.trim().is_empty() {
            return Err(fail("target_new.str is empty".into()));
        }
        let target_text = if self.target_new.text.starts_with(' ') { self.target_new.text.clone() } else { format!(" {}", self.target_new.text) };
        let target_ids = tokenizer.encode(&target_text)?;
        if target_ids.is_empty() {
            return Err(fail(format!("target {target_text:?} tokenises to nothing")));
        }
        Ok(PreparedRequest { request: self.clone(), target_text, target_ids })
    }
}

/// Requests from JSON in MEMIT's format, a list of
/// `{"prompt": "... {} ...", "subject", "target_new": {"str"}}`, or in
/// EasyEdit's, an object of parallel lists (or single strings):
/// `{"prompts": ["Ray Charles, the"], "subject": ["Ray Charles"],
/// "target_new": ["violin"], "ground_truth": ["piano"]}`, where each prompt
/// holds its subject (its first occurrence becomes the `{}`).
pub fn parse_requests(text: &str) -> Result<Vec<EditRequest>> {
    requests_from_json(serde_json::from_str(text).map_err(|e| MemitError::Request { index: 0, detail: format!("not JSON: {e}") })?)
}

/// [`parse_requests`] of JSON already parsed.
pub fn requests_from_json(value: serde_json::Value) -> Result<Vec<EditRequest>> {
    if value.is_array() {
        return serde_json::from_value(value).map_err(|e| MemitError::Request { index: 0, detail: format!("not a list of MEMIT requests ({{\"prompt\", \"subject\", \"target_new\": {{\"str\"}}}}): {e}") });
    }
    let Some(fields) = value.as_object().filter(|o| o.contains_key("prompts")) else {
        return Err(MemitError::Request { index: 0, detail: "neither a list of MEMIT requests nor an EasyEdit object with \"prompts\"".into() });
    };
    let list = |name: &str| -> Result<Option<Vec<String>>> {
        match fields.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(other) => serde_json::from_value(other.clone()).map(Some).map_err(|_| MemitError::Request { index: 0, detail: format!("EasyEdit field \"{name}\" must be a string or a list of strings") }),
        }
    };
    let need = |name: &str| list(name)?.ok_or_else(|| MemitError::Request { index: 0, detail: format!("EasyEdit requests need \"{name}\"") });
    let (prompts, subjects, targets) = (need("prompts")?, need("subject")?, need("target_new")?);
    let truths = list("ground_truth")?;
    if subjects.len() != prompts.len() || targets.len() != prompts.len() || truths.as_ref().is_some_and(|t| t.len() != prompts.len()) {
        return Err(MemitError::Request { index: 0, detail: format!("EasyEdit lists differ in length: {} prompts, {} subjects, {} targets", prompts.len(), subjects.len(), targets.len()) });
    }
    prompts
        .iter()
        .zip(&subjects)
        .zip(&targets)
        .enumerate()
        .map(|(index, ((prompt, subject), target))| {
            if subject.is_empty() || !prompt.contains(subject.as_str()) {
                return Err(MemitError::Request { index, detail: format!("prompt {prompt:?} does not contain its subject {subject:?}") });
            }
            Ok(EditRequest {
                case_id: None,
                prompt: prompt.replacen(subject.as_str(), "{}", 1),
                subject: subject.clone(),
                target_new: TargetText { text: target.clone() },
                target_true: truths.as_ref().map(|t| TargetText { text: t[index].clone() }),
            })
        })
        .collect()
}

/// Token index of the subject's last token in `template` (one `{}`) filled
/// with `subject`: the last token of the filled text that overlaps the
/// subject. Where the subject ends at a token boundary this is MEMIT's
/// index (prefix and subject tokenised separately); where it ends inside a
/// token merged with the text after it ("The {}t is" with "Microsof"), the
/// separate count would point past or beside the subject, so the merged
/// token is the one read and edited.
pub fn subject_last_index(template: &str, subject: &str, tokenizer: &TextTokenizer) -> Result<usize> {
    let start = template.find("{}").ok_or_else(|| MemitError::Request { index: 0, detail: format!("template {template:?} has no {{}}") })?;
    let end = start + subject.len();
    let (_, offsets) = tokenizer.encode_with_offsets(&template.replacen("{}", subject, 1))?;
    offsets
        .iter()
        .rposition(|&(from, to)| from < end && to > start)
        .ok_or_else(|| MemitError::Request { index: 0, detail: format!("subject {subject:?} gives no token in {template:?}") })
}
