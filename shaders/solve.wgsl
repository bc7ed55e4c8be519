// Blocked Cholesky factorisation of SPD systems A X = B (MEMIT's
// (λC + K Kᵀ) X = Kᵀ), in place in A's lower triangle. The matrix lives in
// row panels whose boundaries are multiples of the 64-wide block, so a
// diagonal block is always inside one buffer; trailing updates between
// blocks are matmuls over the lower triangle. The inverse of every factored
// diagonal block is kept too, so triangular solves are matmuls alone.
// WebGPU forbids binding a buffer writably twice in one dispatch, so each
// factored diagonal block and column panel is also written to a scratch
// buffer of its own, which the next steps read instead of the matrix.

const NB: u32 = 64u;

struct Params {
    // Diagonal block: offset of its top-left element and leading dimension.
    diag_off: u32, ld: u32, kb: u32, rows: u32,
    // Rows trsm updates: offset and leading dimension; where the block's
    // inverse goes in `diag_inv`; the block's first row in the matrix.
    x_off: u32, x_ld: u32, inv_off: u32, global_k0: u32,
    // Where trsm also writes its rows: offset and leading dim in `col`.
    col_off: u32, col_ld: u32,
    // Added to every diagonal element as potrf meets it: factors A + shift·I.
    shift: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> diag: array<f32>;
// Rows of L below the diagonal block (trsm).
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
// First failing pivot (global index + 1, as f32), 0 while the matrix is SPD.
@group(0) @binding(3) var<storage, read_write> status: array<f32>;
// The factored diagonal block alone, kb x kb (potrf writes, trsm reads).
@group(0) @binding(4) var<storage, read_write> factor: array<f32>;
// A copy of the rows trsm produces, for the trailing update to read.
@group(0) @binding(5) var<storage, read_write> col: array<f32>;
// Inverses of the factored diagonal blocks, NB x NB each (zero above the diagonal).
@group(0) @binding(6) var<storage, read_write> diag_inv: array<f32>;

var<workgroup> blk: array<f32, 4096>; // NB x NB

// In-place Cholesky of the kb x kb diagonal block (one workgroup, thread t
// owns row t), then its inverse (thread t computes column t by forward
// substitution). A non-positive pivot is recorded and replaced by 1 so the
// rest stays finite; the caller reports it.
@compute @workgroup_size(64)
fn potrf_block(@builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    if (t < p.kb) {
        for (var c = 0u; c <= t; c++) {
            blk[t * NB + c] = diag[p.diag_off + t * p.ld + c];
        }
        blk[t * NB + t] += p.shift;
    }
    workgroupBarrier();
    for (var j = 0u; j < p.kb; j++) {
        if (t == j) {
            var pivot = blk[j * NB + j];
            if (!(pivot > 0.0)) {
                if (status[0] == 0.0) {
                    status[0] = f32(p.global_k0 + j + 1u);
                }
                pivot = 1.0;
            }
            blk[j * NB + j] = sqrt(pivot);
        }
        workgroupBarrier();
        if (t > j && t < p.kb) {
            blk[t * NB + j] = blk[t * NB + j] / blk[j * NB + j];
        }
        workgroupBarrier();
        if (t > j && t < p.kb) {
            let l_tj = blk[t * NB + j];
            for (var c = j + 1u; c <= t; c++) {
                blk[t * NB + c] -= l_tj * blk[c * NB + j];
            }
        }
        workgroupBarrier();
    }
    if (t < p.kb) {
        for (var c = 0u; c <= t; c++) {
            diag[p.diag_off + t * p.ld + c] = blk[t * NB + c];
            factor[t * p.kb + c] = blk[t * NB + c];
        }
        for (var i = 0u; i < p.kb; i++) {
            var v = 0.0;
            if (i == t) {
                v = 1.0 / blk[t * NB + t];
            } else if (i > t) {
                var s = 0.0;
                for (var j = t; j < i; j++) {
                    s += blk[i * NB + j] * diag_inv[p.inv_off + j * NB + t];
                }
                v = -s / blk[i * NB + i];
            }
            diag_inv[p.inv_off + i * NB + t] = v;
        }
    }
}

// Rows below the diagonal block: row ← row · L_kk⁻ᵀ (forward substitution
// per row; one invocation per row).
@compute @workgroup_size(64)
fn trsm_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    for (var r = 0u; r < p.kb; r++) {
        if (t <= r) {
            blk[r * NB + t] = factor[r * p.kb + t];
        }
    }
    workgroupBarrier();
    let row = wid.x * 64u + t;
    if (row >= p.rows) {
        return;
    }
    let base = p.x_off + row * p.x_ld;
    let copy = p.col_off + row * p.col_ld;
    for (var c = 0u; c < p.kb; c++) {
        var s = x[base + c];
        for (var q = 0u; q < c; q++) {
            s -= x[base + q] * blk[c * NB + q];
        }
        s = s / blk[c * NB + c];
        x[base + c] = s;
        col[copy + c] = s;
    }
}
