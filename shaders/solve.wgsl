// Blocked Cholesky factorisation and triangular solves for SPD systems
// A X = B (MEMIT's (λC + K Kᵀ) X = K). The matrix lives in row panels whose
// boundaries are multiples of the 64-wide block, so a diagonal block is
// always inside one buffer; trailing updates between blocks are matmuls.
// Only the lower triangle is ever read. WebGPU forbids binding a buffer
// writably twice in one dispatch, so each factored diagonal block and
// column panel is also written to a scratch buffer of its own, which the
// next steps read instead of the matrix.

const NB: u32 = 64u;

struct Params {
    // Diagonal block: offset of its top-left element and leading dimension.
    diag_off: u32, ld: u32, kb: u32, rows: u32,
    // Rows to update (trsm) or right-hand sides (trsv): offset and leading dim.
    x_off: u32, x_ld: u32, nrhs: u32, global_k0: u32,
    // Where trsm also writes its rows: offset and leading dim in `col`.
    col_off: u32, col_ld: u32,
    // Added to every diagonal element as potrf meets it: factors A + shift·I.
    shift: f32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> diag: array<f32>;
// Rows of L below the diagonal block (trsm) or right-hand sides (trsv).
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
// First failing pivot (global index + 1), 0 while the matrix is SPD.
@group(0) @binding(3) var<storage, read_write> status: array<u32>;
// The factored diagonal block alone, kb x kb (potrf writes, trsm reads).
@group(0) @binding(4) var<storage, read_write> factor: array<f32>;
// A copy of the rows trsm produces, for the trailing update to read.
@group(0) @binding(5) var<storage, read_write> col: array<f32>;

var<workgroup> blk: array<f32, 4096>; // NB x NB

// Copies the lower triangle of the diagonal block into workgroup memory
// (invocation t loads column t).
fn load_block(t: u32) {
    for (var r = 0u; r < p.kb; r++) {
        if (t <= r) {
            blk[r * NB + t] = diag[p.diag_off + r * p.ld + t];
        }
    }
    workgroupBarrier();
}

// In-place Cholesky of the kb x kb diagonal block (one workgroup, thread t
// owns row t). A non-positive pivot is recorded and replaced by 1 so the
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
                if (status[0] == 0u) {
                    status[0] = p.global_k0 + j + 1u;
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

// Solves L_kk Y = B in place for kb rows of nrhs right-hand sides (one
// invocation per right-hand side).
@compute @workgroup_size(64)
fn trsv_lower(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    load_block(lid.x);
    let col = wid.x * 64u + lid.x;
    if (col >= p.nrhs) {
        return;
    }
    for (var i = 0u; i < p.kb; i++) {
        var s = x[p.x_off + i * p.x_ld + col];
        for (var q = 0u; q < i; q++) {
            s -= blk[i * NB + q] * x[p.x_off + q * p.x_ld + col];
        }
        x[p.x_off + i * p.x_ld + col] = s / blk[i * NB + i];
    }
}

// Solves L_kkᵀ X = Y in place (backward substitution).
@compute @workgroup_size(64)
fn trsv_upper(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    load_block(lid.x);
    let col = wid.x * 64u + lid.x;
    if (col >= p.nrhs) {
        return;
    }
    for (var ii = 0u; ii < p.kb; ii++) {
        let i = p.kb - 1u - ii;
        var s = x[p.x_off + i * p.x_ld + col];
        for (var q = i + 1u; q < p.kb; q++) {
            s -= blk[q * NB + i] * x[p.x_off + q * p.x_ld + col];
        }
        x[p.x_off + i * p.x_ld + col] = s / blk[i * NB + i];
    }
}
