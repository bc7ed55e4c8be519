//! Embedding lookup from an f32 or f16 table of any size.

use bytemuck::{Pod, Zeroable};

use super::{require_f32, u32_of};
use crate::context::{GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::shader::{flag, ShaderFamily};
use crate::tensor::{chunk_spans, DType, Indices, Tensor};

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
        self.gather_rows(table, &self.indices(ids)?)
    }

    /// Rows `ids` (already on the GPU) of `table` [vocab, dim] as a new f32
    /// tensor [ids.len(), dim].
    pub fn gather_rows(&self, table: &Tensor, ids: &Indices) -> Result<Tensor> {
        let (vocab, dim) = table.dims2("embedding")?;
        if let Some(bad) = ids.values().iter().find(|&&id| id as usize >= vocab) {
            return Err(GpuError::shape("embedding", format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        if ids.is_empty() {
            return Err(GpuError::shape("embedding", "no token ids"));
        }
        let out = self.empty(&[ids.len(), dim], DType::F32)?;
        let ids_buf = &ids.buffer;
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
                        &[(1, ids_buf), (2, &table_buf), (3, &out_buf)],
                        [dim.div_ceil(256) as u32, slen as u32, 1],
                    )?;
                }
            }
        }
        Ok(out)
    }

    /// [rows, dim] zeros except row `ids[i]` = row i of `src` [ids.len(),
    /// dim] (ids distinct): the gradient of [`GpuContext::gather_rows`].
    pub fn scatter_rows(&self, src: &Tensor, ids: &Indices, rows: usize) -> Result<Tensor> {
        let out = self.zeros(&[rows, src.dims2("scatter_rows")?.1], DType::F32)?;
        self.scatter_rows_into(src, ids, &out)?;
        Ok(out)
    }

    /// Row `ids[i]` of `out` = row i of `src` (ids distinct; an id of
    /// u32::MAX writes nowhere), other rows untouched.
    pub fn scatter_rows_into(&self, src: &Tensor, ids: &Indices, out: &Tensor) -> Result<()> {
        let (n, dim) = src.dims2("scatter_rows")?;
        let (rows, out_dim) = out.dims2("scatter_rows")?;
        require_f32("scatter_rows", &[src, out])?;
        if ids.len() != n || out_dim != dim {
            return Err(GpuError::shape("scatter_rows", format!("{} ids for {n} rows of {dim} into rows of {out_dim}", ids.len())));
        }
        if let Some(bad) = ids.values().iter().find(|&&id| id as usize >= rows && id != u32::MAX) {
            return Err(GpuError::shape("scatter_rows", format!("row {bad} is outside the {rows} destination rows")));
        }
        let defines = [("TABLE_F16", flag(false))];
        let kernel = Kernel { family: ShaderFamily::Embedding, entry: "scatter", defines: &defines };
        let out_spans = chunk_spans(rows, &[&out]);
        for (s0, slen) in chunk_spans(n, &[src]) {
            let (src_buf, src_off) = src.locate(s0);
            for (sub0, sublen) in (0..slen).step_by(IDS_PER_DISPATCH).map(|s| (s0 + s, (slen - s).min(IDS_PER_DISPATCH))) {
                for &(row0, rows_here) in &out_spans {
                    let (out_buf, out_off) = out.locate(row0);
                    let params = Params {
                        n_ids: u32_of(sublen, "scatter_rows")?,
                        dim: u32_of(dim, "scatter_rows")?,
                        row0: u32_of(row0, "scatter_rows")?,
                        rows: u32_of(rows_here, "scatter_rows")?,
                        table_off: u32_of(out_off, "scatter_rows")?,
                        out_off: u32_of(src_off + (sub0 - s0) * dim, "scatter_rows")?,
                        ids_off: u32_of(sub0, "scatter_rows")?,
                        _pad: 0,
                    };
                    self.dispatch(kernel, bytemuck::bytes_of(&params), &[(1, &ids.buffer), (3, &out_buf), (4, &src_buf)], [dim.div_ceil(256) as u32, sublen as u32, 1])?;
                }
            }
        }
        Ok(())
    }
}
