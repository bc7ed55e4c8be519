//! Embedding lookup from an f32 or f16 table of any size.

use bytemuck::{Pod, Zeroable};

use super::u32_of;
use crate::context::{GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::{flag, ShaderFamily};
use crate::tensor::{chunk_spans, DType, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n_ids: u32,
    dim: u32,
    row0: u32,
    rows: u32,
    table_off: u32,
    out_off: u32,
    ids_off: u32,
    _pad: u32,
}

/// Ids per dispatch (one workgroup row each along y).
const IDS_PER_DISPATCH: usize = 65_535;

impl GpuContext {
    /// Rows `ids` of `table` [vocab, dim] as a new f32 tensor [ids.len(), dim].
    pub fn embedding(&self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let (vocab, dim) = table.dims2("embedding")?;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(GpuError::shape("embedding", format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        if ids.is_empty() {
            return Err(GpuError::shape("embedding", "no token ids"));
        }
        let out = self.zeros(&[ids.len(), dim], DType::F32)?;
        let ids_buf = self.upload_u32(ids, "token ids")?;
        let defines = [("TABLE_F16", flag(table.dtype() == DType::F16))];
        let kernel = Kernel { family: ShaderFamily::Embedding, entry: "gather", defines: &defines };
        let table_spans = chunk_spans(vocab, &[table]);
        for (o0, olen) in chunk_spans(ids.len(), &[&out]) {
            for (s0, slen) in (0..olen).step_by(IDS_PER_DISPATCH).map(|s| (o0 + s, (olen - s).min(IDS_PER_DISPATCH))) {
                let (out_buf, out_off) = out.locate(s0);
                for &(row0, rows) in &table_spans {
                    let (table_buf, table_off) = table.locate(row0);
                    let params = Params {
                        n_ids: u32_of(slen, "embedding")?,
                        dim: u32_of(dim, "embedding")?,
                        row0: u32_of(row0, "embedding")?,
                        rows: u32_of(rows, "embedding")?,
                        table_off: u32_of(table_off, "embedding")?,
                        out_off: u32_of(out_off, "embedding")?,
                        ids_off: u32_of(s0, "embedding")?,
                        _pad: 0,
                    };
                    self.dispatch(
                        kernel,
                        bytemuck::bytes_of(&params),
                        &[(1, &ids_buf), (2, &table_buf), (3, &out_buf)],
                        [dim.div_ceil(256) as u32, slen as u32, 1],
                    )?;
                }
            }
        }
        Ok(out)
    }
}
