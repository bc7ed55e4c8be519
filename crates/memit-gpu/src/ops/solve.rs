//! X = A⁻¹B for symmetric positive definite A of any size: blocked
//! right-looking Cholesky in f32 on row panels (each within one storage
//! binding, boundaries on the 64-wide block grid), blocked triangular
//! solves, and one step of iterative refinement against the original A.

use bytemuck::{Pod, Zeroable};

use super::{require_f32, u32_of};
use crate::context::{GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::ops::matmul::{MatmulSpec, MatrixView};
use crate::shader::ShaderFamily;
use crate::tensor::{DType, Tensor};

const NB: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    diag_off: u32,
    ld: u32,
    kb: u32,
    rows: u32,
    x_off: u32,
    x_ld: u32,
    nrhs: u32,
    global_k0: u32,
    col_off: u32,
    col_ld: u32,
    shift: f32,
    _pad: u32,
}

fn kernel(entry: &'static str) -> Kernel<'static> {
    Kernel { family: ShaderFamily::Solve, entry, defines: &[] }
}

/// Rows of a [d, width] matrix split into single-buffer panels of `rows`
/// rows (the last may be shorter).
struct Panels {
    rows: usize,
    width: usize,
    tensors: Vec<Tensor>,
}

impl Panels {
    fn panel_of(&self, row: usize) -> (usize, usize) {
        (row / self.rows, row % self.rows)
    }

    fn range(&self, p: usize, d: usize) -> (usize, usize) {
        (p * self.rows, ((p + 1) * self.rows).min(d))
    }

    fn view(&self, p: usize, local_row: usize, col: usize, rows: usize, cols: usize) -> MatrixView<'_> {
        MatrixView { tensor: &self.tensors[p], offset: local_row * self.width + col, rows, cols, ld: self.width }
    }
}

impl GpuContext {
    /// Copies `src` ([d, width], any chunking) into panels.
    fn to_panels(&self, src: &Tensor, panel_rows: usize) -> Result<Panels> {
        let (d, width) = src.dims2("solve")?;
        let mut tensors = Vec::new();
        for start in (0..d).step_by(panel_rows) {
            let rows = panel_rows.min(d - start);
            let panel = self.zeros(&[rows, width], DType::F32)?;
            let view = src.slice_rows(start..start + rows)?;
            let mut at = 0;
            for seg in view.segments() {
                let bytes = (seg.rows * width * 4) as u64;
                self.copy(&seg.buffer, (seg.offset * 4) as u64, &panel.segments()[0].buffer, (at * width * 4) as u64, bytes);
                at += seg.rows;
            }
            tensors.push(panel);
        }
        Ok(Panels { rows: panel_rows, width, tensors })
    }

    /// The panels joined back into one (chunked) [d, width] tensor.
    fn from_panels(&self, panels: &Panels, d: usize) -> Result<Tensor> {
        let out = self.zeros(&[d, panels.width], DType::F32)?;
        for (p, panel) in panels.tensors.iter().enumerate() {
            let (start, end) = panels.range(p, d);
            let dst = out.slice_rows(start..end)?;
            let mut at = 0;
            for seg in dst.segments() {
                let bytes = (seg.rows * panels.width * 4) as u64;
                self.copy(&panel.segments()[0].buffer, (at * panels.width * 4) as u64, &seg.buffer, (seg.offset * 4) as u64, bytes);
                at += seg.rows;
            }
        }
        Ok(out)
    }

    /// Lower Cholesky factor of `a` + `shift`·I in panels (upper parts hold
    /// garbage).
    async fn cholesky(&self, a: &Tensor, shift: f32) -> Result<Panels> {
        let (d, _) = a.dims2("solve")?;
        let row_bytes = (d * 4) as u64;
        let panel_rows = ((self.chunk_bytes() / row_bytes) as usize / NB) * NB;
        if panel_rows == 0 {
            return Err(GpuError::RowTooLarge { row_bytes: row_bytes * NB as u64, max_binding: self.chunk_bytes() });
        }
        let l = self.to_panels(a, panel_rows)?;
        let status = self.zero_u32(1)?;
        // Scratch copies of the current diagonal block and column panel, so
        // no kernel reads the buffer it writes (WebGPU forbids that).
        let block = NB.min(d);
        let factor = self.zeros(&[block, block], DType::F32)?;
        let columns = l.tensors.iter().map(|t| self.zeros(&[t.shape()[0], block], DType::F32)).collect::<Result<Vec<_>>>()?;
        let columns = Panels { rows: panel_rows, width: block, tensors: columns };
        let factor_buf = factor.single("solve")?.0;
        for k0 in (0..d).step_by(NB) {
            let kb = NB.min(d - k0);
            let (p, local) = l.panel_of(k0);
            let base = Params {
                diag_off: u32_of(local * d + k0, "solve")?,
                ld: u32_of(d, "solve")?,
                kb: kb as u32,
                global_k0: u32_of(k0, "solve")?,
                col_ld: block as u32,
                shift,
                ..Default::default()
            };
            let diag_buf = &l.tensors[p].segments()[0].buffer;
            self.dispatch(kernel("potrf_block"), bytemuck::bytes_of(&base), &[(1, diag_buf), (3, &status.buffer), (4, factor_buf)], [1, 1, 1])?;
            let below = k0 + kb;
            if below >= d {
                break;
            }
            // Rows below the block, panel by panel: L[i, block] ← A[i, block]·L_kk⁻ᵀ.
            for q in p..l.tensors.len() {
                let (q0, q1) = l.range(q, d);
                let first = below.max(q0);
                if first >= q1 {
                    continue;
                }
                let params = Params {
                    rows: (q1 - first) as u32,
                    x_off: u32_of((first - q0) * d + k0, "solve")?,
                    x_ld: d as u32,
                    col_off: u32_of((first - q0) * block, "solve")?,
                    ..base
                };
                self.dispatch(
                    kernel("trsm_rows"),
                    bytemuck::bytes_of(&params),
                    &[(2, &l.tensors[q].segments()[0].buffer), (4, factor_buf), (5, &columns.tensors[q].segments()[0].buffer)],
                    [(q1 - first).div_ceil(64) as u32, 1, 1],
                )?;
            }
            // Trailing update of the lower part: A[i, j] −= L[i, block]·L[j, block]ᵀ.
            let spec = MatmulSpec { trans_a: false, trans_b: true, alpha: -1.0, beta: 1.0 };
            for qi in p..l.tensors.len() {
                let (i0, i1) = l.range(qi, d);
                let ri = below.max(i0);
                if ri >= i1 {
                    continue;
                }
                for qj in p..=qi {
                    let (j0, j1) = l.range(qj, d);
                    let rj = below.max(j0);
                    if rj >= j1 {
                        continue;
                    }
                    let a_view = columns.view(qi, ri - i0, 0, i1 - ri, kb);
                    let b_view = columns.view(qj, rj - j0, 0, j1 - rj, kb);
                    let c_view = l.view(qi, ri - i0, rj, i1 - ri, j1 - rj);
                    self.matmul_views(a_view, b_view, c_view, spec)?;
                }
            }
        }
        match self.read_u32(&status).await?.first().copied() {
            Some(0) => Ok(l),
            Some(pivot) => Err(GpuError::NotPositiveDefinite { pivot: pivot as usize - 1 }),
            None => Err(GpuError::Readback("empty status".into())),
        }
    }

    /// Solves L Lᵀ X = B in place on `x` (panels of B). Each block of rows
    /// is staged in a scratch tensor while it is solved, so no matmul reads
    /// the buffer it writes.
    fn cholesky_substitute(&self, l: &Panels, x: &Panels, d: usize) -> Result<()> {
        let n = x.width;
        let stage = self.zeros(&[NB.min(d), n], DType::F32)?;
        let stage_buf = stage.single("solve")?.0;
        let row_bytes = (n * 4) as u64;
        let groups = [n.div_ceil(64) as u32, 1, 1];
        let solve_block = |entry: &'static str, k0: usize, updates: &mut dyn FnMut(MatrixView<'_>) -> Result<()>| -> Result<()> {
            let kb = NB.min(d - k0);
            let (p, local) = l.panel_of(k0);
            let x_buf = &x.tensors[p].segments()[0].buffer;
            self.copy(x_buf, local as u64 * row_bytes, stage_buf, 0, kb as u64 * row_bytes);
            updates(MatrixView { tensor: &stage, offset: 0, rows: kb, cols: n, ld: n })?;
            let params = Params {
                diag_off: u32_of(local * l.width + k0, "solve")?,
                ld: u32_of(l.width, "solve")?,
                kb: kb as u32,
                x_ld: u32_of(n, "solve")?,
                nrhs: u32_of(n, "solve")?,
                ..Default::default()
            };
            self.dispatch(kernel(entry), bytemuck::bytes_of(&params), &[(1, &l.tensors[p].segments()[0].buffer), (2, stage_buf)], groups)?;
            self.copy(stage_buf, 0, x_buf, local as u64 * row_bytes, kb as u64 * row_bytes);
            Ok(())
        };
        // Forward: L Y = B.
        for k0 in (0..d).step_by(NB) {
            let kb = NB.min(d - k0);
            let (p, local) = l.panel_of(k0);
            let spec = MatmulSpec { alpha: -1.0, beta: 1.0, ..Default::default() };
            solve_block("trsv_lower", k0, &mut |block| {
                for q in 0..=p {
                    let (q0, q1) = l.range(q, d);
                    let cols_end = q1.min(k0);
                    if q0 < cols_end {
                        let a_view = l.view(p, local, q0, kb, cols_end - q0);
                        self.matmul_views(a_view, x.view(q, 0, 0, cols_end - q0, n), block, spec)?;
                    }
                }
                Ok(())
            })?;
        }
        // Backward: Lᵀ X = Y.
        let last_block = (d - 1) / NB * NB;
        for k0 in (0..=last_block).rev().step_by(NB) {
            let kb = NB.min(d - k0);
            let below = k0 + kb;
            let p = l.panel_of(k0).0;
            let spec = MatmulSpec { trans_a: true, alpha: -1.0, beta: 1.0, ..Default::default() };
            solve_block("trsv_upper", k0, &mut |block| {
                for q in p..l.tensors.len() {
                    let (q0, q1) = l.range(q, d);
                    let first = below.max(q0);
                    if first < q1 {
                        let a_view = l.view(q, first - q0, k0, q1 - first, kb);
                        self.matmul_views(a_view, x.view(q, first - q0, 0, q1 - first, n), block, spec)?;
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// X = A⁻¹B for symmetric positive definite `a` ([d, d], stored whole:
    /// the factorisation reads its lower triangle, the refinement all of it)
    /// and `b` ([d, n]), in f32 with one step of iterative refinement. Fails
    /// with `NotPositiveDefinite` naming the first bad pivot.
    pub async fn solve_spd(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.solve_spd_shifted(a, b, 0.0).await
    }

    /// As `solve_spd`, but factors A + `shift`·I and refines against A
    /// itself: for a positive semi-definite A that f32 rounding leaves with
    /// a non-positive pivot (a second moment of keys spanning fewer
    /// directions than d), where B lies in A's range, a shift far below A's
    /// scale changes the solution only along directions B barely touches.
    pub async fn solve_spd_shifted(&self, a: &Tensor, b: &Tensor, shift: f32) -> Result<Tensor> {
        require_f32("solve_spd", &[a, b])?;
        let (d, d2) = a.dims2("solve_spd")?;
        let (rows, _) = b.dims2("solve_spd")?;
        if d != d2 || rows != d {
            return Err(GpuError::shape("solve_spd", format!("A is {:?}, B is {:?}", a.shape(), b.shape())));
        }
        let l = self.cholesky(a, shift).await?;
        let x = self.to_panels(b, l.rows)?;
        self.cholesky_substitute(&l, &x, d)?;
        let solution = self.from_panels(&x, d)?;
        // Refinement: r = B − A·X, solve A·e = r, X += e.
        let residual = self.affine(b, 1.0, 0.0)?;
        self.matmul_into(a, &solution, &residual, MatmulSpec { alpha: -1.0, beta: 1.0, ..Default::default() })?;
        let correction = self.to_panels(&residual, l.rows)?;
        self.cholesky_substitute(&l, &correction, d)?;
        let correction = self.from_panels(&correction, d)?;
        self.axpby(1.0, &correction, 1.0, &solution)?;
        Ok(solution)
    }
}
