//! SPD systems A X = B of any size on the GPU: a blocked right-looking
//! Cholesky factorisation in place in A's lower triangle (row panels within
//! one storage binding each, boundaries on the 64-wide block grid; columns
//! factored 256 at a time, 64 by 64 inside, before the trailing matrix is
//! updated over its lower triangle only), which also inverts every diagonal
//! block, so the triangular solves are right-looking sequences of matmuls.

use bytemuck::{Pod, Zeroable};

use super::{require_f32, u32_of};
use crate::context::{GpuContext, Kernel};
use crate::error::{GpuError, Result};
use crate::ops::matmul::{MatmulSpec, MatrixView};
use crate::shader::ShaderFamily;
use crate::tensor::{chunk_spans, DType, Tensor};

/// Block size of the factorisation (the kernels' workgroup width).
pub const SOLVE_BLOCK: usize = 64;
const NB: usize = SOLVE_BLOCK;
/// Columns factored before the trailing matrix is updated: the inner
/// dimension of the trailing products, which are most of the work
/// (64 → 256 about doubles their rate on lavapipe, where a workgroup's
/// fixed cost dominates a 64-deep tile, and quarters the trailing
/// matrix's reads and writes on a GPU). Also the width of the column
/// scratch.
pub const FACTOR_PANEL: usize = 4 * NB;
/// `factor_spd_checked` stops reading the status once fewer rows than this
/// remain: the rest costs less than a host wait is worth.
const CHECKED_ROWS: usize = 1024;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    diag_off: u32,
    ld: u32,
    kb: u32,
    rows: u32,
    x_off: u32,
    x_ld: u32,
    inv_off: u32,
    global_k0: u32,
    col_off: u32,
    col_ld: u32,
    shift: f32,
    _pad: u32,
}

fn kernel(entry: &'static str) -> Kernel<'static> {
    Kernel { family: ShaderFamily::Solve, entry, defines: &[] }
}

/// A [d, width] matrix stored as single-buffer panels of `rows` rows (the
/// last may be shorter): the chunks of a tensor made by
/// `zeros_in_row_blocks`, viewed without copying.
struct Panels {
    rows: usize,
    width: usize,
    tensors: Vec<Tensor>,
}

impl Panels {
    /// The panels of `t`, when its storage chunks all hold the same
    /// multiple of the block size (but the last).
    fn of(t: &Tensor) -> Option<Panels> {
        let (d, width) = t.dims2("solve").ok()?;
        let chunk_rows: Vec<usize> = t.segments().iter().map(|s| s.rows).collect();
        let rows = chunk_rows[0];
        let aligned = rows % NB == 0 || chunk_rows.len() == 1;
        if !aligned || chunk_rows[..chunk_rows.len() - 1].iter().any(|&r| r != rows) {
            return None;
        }
        let tensors = (0..chunk_rows.len()).map(|p| t.slice_rows(p * rows..((p + 1) * rows).min(d))).collect::<Result<_>>().ok()?;
        Some(Panels { rows: rows.max(1), width, tensors })
    }

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

/// L with L·Lᵀ = A + shift·I, factored in place in A's storage, with the
/// inverses of its diagonal blocks. Made by [`GpuContext::factor_spd`];
/// check [`SpdFactor::status`] before trusting solves with it.
pub struct SpdFactor {
    d: usize,
    l: Panels,
    /// Keeps A's storage (which `l` views) alive.
    _storage: Tensor,
    /// [blocks·NB, NB]: block k's inverse in rows k·NB ..
    diag_inv: Tensor,
    status: Tensor,
}

impl SpdFactor {
    /// One f32: 0 if every pivot was positive, else the first bad pivot's
    /// index + 1. Read it (with the solution, in one `read_all`) and pass
    /// it to [`SpdFactor::check`].
    pub fn status(&self) -> &Tensor {
        &self.status
    }

    /// Turns a read status into `NotPositiveDefinite`.
    pub fn check(status: f32) -> Result<()> {
        if status == 0.0 {
            Ok(())
        } else {
            Err(GpuError::NotPositiveDefinite { pivot: status as usize - 1 })
        }
    }

    pub fn dim(&self) -> usize {
        self.d
    }
}

/// A factorisation in progress: the factor and the scratch its kernels
/// write (dropped when it ends).
struct Factoring {
    factor: SpdFactor,
    /// The factored diagonal block.
    block: Tensor,
    /// The current panel's columns of L, in L's row panels.
    columns: Panels,
    shift: f32,
}

impl GpuContext {
    /// A zeroed [d, width] matrix laid out for the solver: storage chunks
    /// of whole 64-row blocks.
    pub fn solver_matrix(&self, d: usize, width: usize) -> Result<Tensor> {
        self.zeros_in_row_blocks(&[d, width], NB)
    }

    /// A += `alpha`·KᵀK over A's lower triangle (the part `factor_spd`
    /// reads), for A [d, d] from [`GpuContext::solver_matrix`] and K
    /// [n, d]: one product per row panel of A and binding of K, tiles above
    /// the diagonal skipped, so about half the work of the full product.
    pub fn add_gram_lower(&self, a: &Tensor, keys: &Tensor, alpha: f32) -> Result<()> {
        require_f32("add_gram_lower", &[a, keys])?;
        let (n, d) = keys.dims2("add_gram_lower")?;
        if a.shape() != [d, d] {
            return Err(GpuError::shape("add_gram_lower", format!("A is {:?} for keys of width {d}", a.shape())));
        }
        let l = Panels::of(a).ok_or_else(|| GpuError::shape("add_gram_lower", "A is not in the solver's layout (make it with solver_matrix)"))?;
        let spec = MatmulSpec { trans_a: true, trans_b: false, alpha, beta: 1.0 };
        for (t0, rows) in chunk_spans(n, &[keys]) {
            let k = keys.slice_rows(t0..t0 + rows)?;
            for (p, panel) in l.tensors.iter().enumerate() {
                let (i0, i1) = l.range(p, d);
                let k_rows = MatrixView { tensor: &k, offset: i0, rows, cols: i1 - i0, ld: d };
                let k_cols = MatrixView { tensor: &k, offset: 0, rows, cols: i1, ld: d };
                let target = MatrixView { tensor: panel, offset: 0, rows: i1 - i0, cols: i1, ld: d };
                self.matmul_views_lower(k_rows, k_cols, target, spec, i0, 0)?;
            }
        }
        Ok(())
    }

    /// Factors `a` ([d, d]; only its lower triangle is read) in place:
    /// A + `shift`·I = L·Lᵀ. `a` should come from [`GpuContext::solver_matrix`];
    /// any other layout is first copied into one. No readback happens here:
    /// a bad pivot shows in [`SpdFactor::status`].
    pub fn factor_spd(&self, a: Tensor, shift: f32) -> Result<SpdFactor> {
        let factoring = self.begin_factor(a, shift)?;
        for k0 in (0..factoring.factor.d).step_by(FACTOR_PANEL) {
            self.factor_panel(&factoring, k0)?;
            self.update_after_panel(&factoring, k0)?;
        }
        Ok(factoring.factor)
    }

    /// As [`GpuContext::factor_spd`], but reads the status after every
    /// panel of [`FACTOR_PANEL`] columns (before the trailing matrix is
    /// updated with it) while at least [`CHECKED_ROWS`] rows remain, so a
    /// matrix that is not definite fails with `NotPositiveDefinite` at the
    /// cost of the columns up to its bad pivot, not of the whole
    /// factorisation (a rank-deficient covariance fails within its first
    /// few hundred pivots). The last status is left unread: read it with
    /// the first solution.
    pub async fn factor_spd_checked(&self, a: Tensor, shift: f32) -> Result<SpdFactor> {
        let factoring = self.begin_factor(a, shift)?;
        let d = factoring.factor.d;
        for k0 in (0..d).step_by(FACTOR_PANEL) {
            self.factor_panel(&factoring, k0)?;
            if d - (k0 + FACTOR_PANEL).min(d) >= CHECKED_ROWS {
                SpdFactor::check(self.read(&factoring.factor.status).await?[0])?;
            }
            self.update_after_panel(&factoring, k0)?;
        }
        Ok(factoring.factor)
    }

    /// The factor's storage and the scratch its kernels write.
    fn begin_factor(&self, a: Tensor, shift: f32) -> Result<Factoring> {
        require_f32("factor_spd", &[&a])?;
        let (d, d2) = a.dims2("factor_spd")?;
        if d != d2 {
            return Err(GpuError::shape("factor_spd", format!("A is {:?}, not square", a.shape())));
        }
        let a = match Panels::of(&a) {
            Some(_) => a,
            None => {
                let aligned = self.solver_matrix(d, d)?;
                self.affine_into(&a, 1.0, 0.0, &aligned)?;
                aligned
            }
        };
        let l = Panels::of(&a).expect("solver layout");
        let diag_inv = self.empty(&[d.div_ceil(NB) * NB, NB], DType::F32)?;
        let status = self.zeros(&[1], DType::F32)?;
        // Scratch copies of the current diagonal block and column panel, so
        // no kernel reads the buffer it writes (WebGPU forbids that).
        let block = self.empty(&[NB.min(d), NB.min(d)], DType::F32)?;
        let width = FACTOR_PANEL.min(d);
        let columns = l.tensors.iter().map(|t| self.empty(&[t.shape()[0], width], DType::F32)).collect::<Result<Vec<_>>>()?;
        let columns = Panels { rows: l.rows, width, tensors: columns };
        Ok(Factoring { factor: SpdFactor { d, l, _storage: a, diag_inv, status }, block, columns, shift })
    }

    /// Factors columns k0 .. k0 + FACTOR_PANEL, block by block: each
    /// diagonal block, the rows below it, and the panel's later columns.
    fn factor_panel(&self, f: &Factoring, k0: usize) -> Result<()> {
        let (d, l, columns) = (f.factor.d, &f.factor.l, &f.columns);
        let panel_end = (k0 + FACTOR_PANEL).min(d);
        let block_buf = f.block.single("factor_spd")?.0;
        let (inv_buf, _) = f.factor.diag_inv.single("factor_spd (diagonal inverses exceed one binding)")?;
        let (status_buf, _) = f.factor.status.single("factor_spd")?;
        for j0 in (k0..panel_end).step_by(NB) {
            let kb = NB.min(d - j0);
            let (p, local) = l.panel_of(j0);
            let (diag_buf, diag_base) = l.tensors[p].single("factor_spd")?;
            let base = Params {
                diag_off: u32_of(diag_base + local * d + j0, "factor_spd")?,
                ld: u32_of(d, "factor_spd")?,
                kb: kb as u32,
                inv_off: u32_of(j0 * NB, "factor_spd")?,
                global_k0: u32_of(j0, "factor_spd")?,
                col_ld: columns.width as u32,
                shift: f.shift,
                ..Default::default()
            };
            self.dispatch(kernel("potrf_block"), bytemuck::bytes_of(&base), &[(1, diag_buf), (3, status_buf), (4, block_buf), (6, inv_buf)], [1, 1, 1])?;
            let below = j0 + kb;
            if below >= d {
                return Ok(());
            }
            // Rows below the block, panel by panel: L[i, block] ← A[i, block]·L_kk⁻ᵀ.
            for q in p..l.tensors.len() {
                let (q0, q1) = l.range(q, d);
                let first = below.max(q0);
                if first >= q1 {
                    continue;
                }
                let (x_buf, x_base) = l.tensors[q].single("factor_spd")?;
                let params = Params {
                    rows: (q1 - first) as u32,
                    x_off: u32_of(x_base + (first - q0) * d + j0, "factor_spd")?,
                    x_ld: d as u32,
                    col_off: u32_of((first - q0) * columns.width + (j0 - k0), "factor_spd")?,
                    ..base
                };
                self.dispatch(
                    kernel("trsm_rows"),
                    bytemuck::bytes_of(&params),
                    &[(2, x_buf), (4, block_buf), (5, columns.tensors[q].single("factor_spd")?.0)],
                    [(q1 - first).div_ceil(64) as u32, 1, 1],
                )?;
            }
            // The panel's later columns, with this block's.
            self.update_lower(l, columns, (j0 - k0, kb), below, panel_end)?;
        }
        Ok(())
    }

    /// The trailing matrix right of the panel at k0, with all of the
    /// panel's columns as the products' inner dimension.
    fn update_after_panel(&self, f: &Factoring, k0: usize) -> Result<()> {
        let (d, panel_end) = (f.factor.d, (k0 + FACTOR_PANEL).min(f.factor.d));
        if panel_end >= d {
            return Ok(());
        }
        self.update_lower(&f.factor.l, &f.columns, (0, panel_end - k0), panel_end, d)
    }

    /// A[i, c] −= Σ_k L[i, k]·L[c, k] over the lower triangle (i ≥ c) for
    /// rows i ≥ `first` and columns c in `first` .. `last`, with the k's
    /// the `columns` scratch's columns `offset` .. `offset + width`: one
    /// product per pair of row panels, tiles above the diagonal skipped.
    fn update_lower(&self, l: &Panels, columns: &Panels, (offset, width): (usize, usize), first: usize, last: usize) -> Result<()> {
        let d = l.width;
        let spec = MatmulSpec { trans_a: false, trans_b: true, alpha: -1.0, beta: 1.0 };
        for qi in l.panel_of(first).0..l.tensors.len() {
            let (i0, i1) = l.range(qi, d);
            let ri = first.max(i0);
            for qj in l.panel_of(first).0..=qi {
                let (j0, j1) = l.range(qj, d);
                let rj = first.max(j0);
                let cols_end = j1.min(i1).min(last);
                if ri >= i1 || rj >= cols_end {
                    continue;
                }
                let a_view = columns.view(qi, ri - i0, offset, i1 - ri, width);
                let b_view = columns.view(qj, rj - j0, offset, cols_end - rj, width);
                let c_view = l.view(qi, ri - i0, rj, i1 - ri, cols_end - rj);
                self.matmul_views_lower(a_view, b_view, c_view, spec, ri, rj)?;
            }
        }
        Ok(())
    }

    /// A zeroed [d, n] right-hand side laid out in `f`'s row panels, for
    /// [`GpuContext::solve_factored_in_place`] (fill it with `write`).
    pub fn solver_rhs(&self, f: &SpdFactor, n: usize) -> Result<Tensor> {
        self.zeros_in_row_blocks(&[f.d, n], f.l.rows)
    }

    /// X = (L·Lᵀ)⁻¹ B for B [d, n], into a new tensor; B is left as it was
    /// (copied into the solver's layout first).
    pub fn solve_factored(&self, f: &SpdFactor, b: &Tensor) -> Result<Tensor> {
        require_f32("solve_factored", &[b])?;
        let (d, n) = b.dims2("solve_factored")?;
        if d != f.d {
            return Err(GpuError::shape("solve_factored", format!("B has {d} rows for a {}x{} system", f.d, f.d)));
        }
        let x = self.solver_rhs(f, n)?;
        self.affine_into(b, 1.0, 0.0, &x)?;
        self.solve_factored_in_place(f, &x)?;
        Ok(x)
    }

    /// Overwrites `b` ([d, n], from [`GpuContext::solver_rhs`]) with
    /// X = (L·Lᵀ)⁻¹ B, holding one more [d, n] tensor meanwhile: forward
    /// substitution writes Y into the scratch while B's rows are consumed
    /// block by block, then backward substitution writes X into B's rows.
    /// A block's solution is its right-hand side times the block's
    /// inverse, then the rows not yet solved are updated with it.
    pub fn solve_factored_in_place(&self, f: &SpdFactor, b: &Tensor) -> Result<()> {
        require_f32("solve_factored", &[b])?;
        let (d, n) = b.dims2("solve_factored")?;
        if d != f.d {
            return Err(GpuError::shape("solve_factored", format!("B has {d} rows for a {}x{} system", f.d, f.d)));
        }
        let l = &f.l;
        // B and the scratch viewed in L's row panels, each within one buffer.
        let panels = |t: &Tensor| -> Option<Panels> {
            let tensors: Vec<Tensor> = (0..l.tensors.len()).map(|p| t.slice_rows(l.range(p, d).0..l.range(p, d).1).ok()).collect::<Option<_>>()?;
            tensors.iter().all(|t| t.n_chunks() == 1).then_some(Panels { rows: l.rows, width: n, tensors })
        };
        let rhs = panels(b).ok_or_else(|| GpuError::shape("solve_factored_in_place", "B is not in the factor's row panels (make it with solver_rhs)"))?;
        let y = panels(&self.solver_rhs(f, n)?).expect("solver layout");
        let inv = |k0: usize, kb: usize| MatrixView { tensor: &f.diag_inv, offset: k0 * NB, rows: kb, cols: kb, ld: NB };
        let update = MatmulSpec { alpha: -1.0, beta: 1.0, ..Default::default() };
        // Forward: L Y = B (Y in the scratch; B's rows below the block
        // updated, its block's rows dead once read).
        for k0 in (0..d).step_by(NB) {
            let kb = NB.min(d - k0);
            let (p, local) = l.panel_of(k0);
            self.matmul_views(inv(k0, kb), rhs.view(p, local, 0, kb, n), y.view(p, local, 0, kb, n), MatmulSpec::default())?;
            for q in p..l.tensors.len() {
                let (q0, q1) = l.range(q, d);
                let first = (k0 + kb).max(q0);
                if first < q1 {
                    self.matmul_views(l.view(q, first - q0, k0, q1 - first, kb), y.view(p, local, 0, kb, n), rhs.view(q, first - q0, 0, q1 - first, n), update)?;
                }
            }
        }
        // Backward: Lᵀ X = Y (X into B's rows, Y's rows above updated).
        let last_block = (d - 1) / NB * NB;
        for k0 in (0..=last_block).rev().step_by(NB) {
            let kb = NB.min(d - k0);
            let (p, local) = l.panel_of(k0);
            self.matmul_views(inv(k0, kb), y.view(p, local, 0, kb, n), rhs.view(p, local, 0, kb, n), MatmulSpec { trans_a: true, ..Default::default() })?;
            for q in 0..=p {
                let (q0, q1) = l.range(q, d);
                let end = q1.min(k0);
                if q0 < end {
                    let a_view = l.view(p, local, q0, kb, end - q0);
                    self.matmul_views(a_view, rhs.view(p, local, 0, kb, n), y.view(q, 0, 0, end - q0, n), MatmulSpec { trans_a: true, ..update })?;
                }
            }
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
        let copy = self.solver_matrix(d, d)?;
        self.affine_into(a, 1.0, 0.0, &copy)?;
        let factor = self.factor_spd(copy, shift)?;
        let solution = self.solve_factored(&factor, b)?;
        // Refinement: r = B − A·X, solve A·e = r, X += e.
        let residual = self.affine(b, 1.0, 0.0)?;
        self.matmul_into(a, &solution, &residual, MatmulSpec { alpha: -1.0, beta: 1.0, ..Default::default() })?;
        let correction = self.solve_factored(&factor, &residual)?;
        self.axpby(1.0, &correction, 1.0, &solution)?;
        SpdFactor::check(self.read(factor.status()).await?[0])?;
        Ok(solution)
    }
}
