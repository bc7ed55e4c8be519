//! Whole-file hashes for the safetensors files this crate writes (patches,
//! statistics caches and checkpoints): every metadata entry and every
//! tensor is covered, so a flipped bit anywhere is found before anything in
//! the file is used.

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

/// SHA-256 of every metadata entry but `hash_key` (sorted by key) and every
/// tensor (sorted by name), each field length-prefixed so that no two
/// different files hash alike.
pub(crate) fn file_hash<'a>(meta: &HashMap<String, String>, hash_key: &str, tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [usize], &'a [u8])>) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != hash_key).collect();
    keys.sort();
    for k in keys {
        field(k.as_bytes());
        field(meta[k].as_bytes());
    }
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, shape, data) in tensors {
        field(name.as_bytes());
        field(format!("{dtype:?}{shape:?}").as_bytes());
        field(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises `tensors` with `meta` plus, under `hash_key`, the hash of both.
pub(crate) fn serialize_hashed(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], mut meta: HashMap<String, String>, hash_key: &str) -> Result<Vec<u8>, String> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| Ok((name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).map_err(|e| e.to_string())?)))
        .collect::<Result<Vec<_>, String>>()?;
    let hash = file_hash(&meta, hash_key, tensors.iter().map(|(name, dtype, shape, data)| (name.as_str(), *dtype, shape.as_slice(), data.as_slice())));
    meta.insert(hash_key.into(), hash);
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

/// Whether the file's recorded hash under `hash_key` matches its contents
/// (None: the file records no hash).
pub(crate) fn verify(st: &SafeTensors<'_>, meta: &HashMap<String, String>, hash_key: &str) -> Option<bool> {
    let recorded = meta.get(hash_key)?;
    let tensors = st.tensors();
    let hash = file_hash(meta, hash_key, tensors.iter().map(|(name, v)| (name.as_str(), v.dtype(), v.shape(), v.data())));
    Some(*recorded == hash)
}
