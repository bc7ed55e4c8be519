// Matrix products: C = alpha * op(A) * op(B) + beta * C (batched over z),
// the syrk-style covariance accumulate C += alpha * K^T K, and the mirror of
// an upper triangle into the lower one.
//
// An 8x8 workgroup owns a 64x64 tile of C. Each invocation keeps an 8x8
// register block, rows 8*ly .. 8*ly+7 and columns 8*lx .. 8*lx+7, as 16
// vec4 accumulators. Per step along k, 16x64 slices of op(A) and op(B) are
// staged in workgroup memory as vec4s (8 KiB), so the inner loop does four
// vec4 loads per 16 vec4 FMAs. Loops have constant bounds so drivers
// unroll them and keep the accumulators in registers.
// f16 operands are stored two per u32 and read with unpack2x16float, which
// every adapter supports (no shader-f16 needed); accumulation is f32.
// An activated product also writes act(C) (or, GATED, act(gate) * up from
// B's gate | up rows) to `keys` in its epilogue, so an MLP's input
// projection and activation are one dispatch.

const TRANS_A: bool = {{TRANS_A}};
const TRANS_B: bool = {{TRANS_B}};
const A_F16: bool = {{A_F16}};
const B_F16: bool = {{B_F16}};
// B (stored [N, K] or [K, N]) holds the gate rows 0..n and the up rows
// n..2n of n features; C is [M, 2n] (gate | up before the activation).
const GATED: bool = {{GATED}};

const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;

{{MATMUL_PARAMS}}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
// Kahan compensation terms of C (syrk only).
@group(0) @binding(4) var<storage, read_write> comp_c: array<f32>;
// The epilogue's addend (matmul), or the source rows of the mirror step
// when they are in another buffer than c.
@group(0) @binding(5) var<storage, read> extra: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
// The activations of an activated product (only its spliced store uses it).
@group(0) @binding(7) var<storage, read_write> keys: array<f32>;
// Split-K partial sums, [splits][M][part_ld] (`matmul_split_sum` only).
@group(0) @binding(12) var<storage, read> partials: array<f32>;

{{ACTIVATION_FN}}

var<workgroup> tile_a: array<vec4<f32>, 256>;  // [TILE_K][TILE_M / 4]
var<workgroup> tile_b: array<vec4<f32>, 256>;  // [TILE_K][TILE_N / 4]

fn load_a(i: u32) -> f32 {
    if (A_F16) {
        return unpack2x16float(a[i >> 1u])[i & 1u];
    }
    return bitcast<f32>(a[i]);
}

fn load_b(i: u32) -> f32 {
    if (B_F16) {
        return unpack2x16float(b[i >> 1u])[i & 1u];
    }
    return bitcast<f32>(b[i]);
}

// op(A)[m, k], zero outside the matrix.
fn a_at(a_base: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) {
        return 0.0;
    }
    if (TRANS_A) {
        return load_a(a_base + k * p.lda + m);
    }
    return load_a(a_base + m * p.lda + k);
}

// op(B)[k, n], zero outside the matrix.
fn b_at(b_base: u32, k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) {
        return 0.0;
    }
    return b_load(b_base, k, n);
}

// op(B)[k, n] for n < p.n (and n < 2 * p.n when GATED), k < p.k.
fn b_load(b_base: u32, k: u32, n: u32) -> f32 {
    if (TRANS_B) {
        return load_b(b_base + n * p.ldb + k);
    }
    return load_b(b_base + k * p.ldb + n);
}

// The gate (up = 0) or up (up = p.n) weight of feature f at k, zero
// outside the matrix.
fn gated_b_at(b_base: u32, k: u32, f: u32, up: u32) -> f32 {
    if (k >= p.k || f >= p.n) {
        return 0.0;
    }
    return b_load(b_base, k, f + up);
}

// Accumulates this invocation's 8x8 block of op(A)[row0.., :] * op(B)[:, col0..]:
// element (i, 4*h + j) of the block is acc[2*i + h][j].
fn accumulate_tile(row0: u32, col0: u32, a_base: u32, b_base: u32, li: u32, lid: vec3<u32>) -> array<vec4<f32>, 16> {
    return accumulate_tile_range(row0, col0, a_base, b_base, li, lid, 0u, p.k);
}

// The same over k in [k_begin, k_end) (k_begin a multiple of TILE_K).
fn accumulate_tile_range(row0: u32, col0: u32, a_base: u32, b_base: u32, li: u32, lid: vec3<u32>, k_begin: u32, k_end: u32) -> array<vec4<f32>, 16> {
    var acc: array<vec4<f32>, 16>;
    for (var k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        // Invocation li stages vec4s li, li + 64, li + 128, li + 192 of each
        // slice: 4 consecutive rows of A / columns of B at one k.
        for (var r = 0u; r < 4u; r++) {
            let v = li + 64u * r;
            // Rows past k_end read as zeros (a_at/b_at treat k >= p.k so;
            // a slab ends on a TILE_K boundary or at p.k).
            let k = k0 + v / 16u;
            let m = row0 + 4u * (v % 16u);
            tile_a[v] = vec4<f32>(a_at(a_base, m, k), a_at(a_base, m + 1u, k), a_at(a_base, m + 2u, k), a_at(a_base, m + 3u, k));
            if (GATED) {
                // Groups of four columns alternate between the gate and the
                // up rows of the same four features, so each invocation's
                // b_lo / b_hi below are a feature's gate and up.
                let g = v % 16u;
                let f = col0 / 2u + 4u * (g / 2u);
                let up = (g % 2u) * p.n;
                tile_b[v] = vec4<f32>(gated_b_at(b_base, k, f, up), gated_b_at(b_base, k, f + 1u, up), gated_b_at(b_base, k, f + 2u, up), gated_b_at(b_base, k, f + 3u, up));
            } else {
                let n = col0 + 4u * (v % 16u);
                tile_b[v] = vec4<f32>(b_at(b_base, k, n), b_at(b_base, k, n + 1u), b_at(b_base, k, n + 2u), b_at(b_base, k, n + 3u));
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let a_lo = tile_a[kk * 16u + 2u * lid.y];
            let a_hi = tile_a[kk * 16u + 2u * lid.y + 1u];
            let b_lo = tile_b[kk * 16u + 2u * lid.x];
            let b_hi = tile_b[kk * 16u + 2u * lid.x + 1u];
            for (var i = 0u; i < 4u; i++) {
                acc[2u * i] = fma(vec4<f32>(a_lo[i]), b_lo, acc[2u * i]);
                acc[2u * i + 1u] = fma(vec4<f32>(a_lo[i]), b_hi, acc[2u * i + 1u]);
                acc[8u + 2u * i] = fma(vec4<f32>(a_hi[i]), b_lo, acc[8u + 2u * i]);
                acc[8u + 2u * i + 1u] = fma(vec4<f32>(a_hi[i]), b_hi, acc[8u + 2u * i + 1u]);
            }
        }
        workgroupBarrier();
    }
    return acc;
}

// Whether the block of C from row row0 (`rows` rows) and column col0 lies
// wholly above the diagonal of a lower-triangle product (the blocked
// solver's views: p.row_base and p.col_base place the block in the whole
// matrix), so it has nothing to write.
fn above_diagonal(row0: u32, col0: u32, rows: u32) -> bool {
    return p.lower_only != 0u && p.col_base + col0 >= p.row_base + row0 + rows;
}

// alpha * product + beta * C for element (gm, gn) of C, plus the terms the
// host puts in EPILOGUE_TERMS: `extra` (a residual laid out like C with row
// stride add_ld) and `bias` (one value per column). They are spliced in as
// code, not guarded by constants, so a product without them binds neither.
fn epilogue(idx: u32, gm: u32, gn: u32, product: f32) -> f32 {
    var v = p.alpha * product;
    if (p.beta != 0.0) {
        v += p.beta * c[idx];
    }
    {{EPILOGUE_TERMS}}
    return v;
}

@compute @workgroup_size(8, 8, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    if (above_diagonal(row0, col0, TILE_M)) {
        return;
    }
    let acc = accumulate_tile(row0, col0, p.a_off + wid.z * p.a_bstride, p.b_off + wid.z * p.b_bstride, li, lid);
    let c_base = p.c_off + wid.z * p.c_bstride;
    if (GATED) {
        // This invocation holds features col0 / 2 + 4 * lid.x + j: their
        // gate in acc[2i][j], their up in acc[2i + 1][j].
        for (var i = 0u; i < 8u; i++) {
            let gm = row0 + 8u * lid.y + i;
            for (var j = 0u; j < 4u; j++) {
                let gn = col0 / 2u + 4u * lid.x + j;
                if (gm < p.m && gn < p.n) {
                    store_gated(c_base + gm * p.ldc + gn, gm, gn, acc[2u * i][j], acc[2u * i + 1u][j]);
                }
            }
        }
        return;
    }
    for (var i = 0u; i < 8u; i++) {
        let gm = row0 + 8u * lid.y + i;
        for (var j = 0u; j < 8u; j++) {
            let gn = col0 + 8u * lid.x + j;
            if (gm < p.m && gn < p.n) {
                store(c_base + gm * p.ldc + gn, gm, gn, acc[2u * i + j / 4u][j % 4u]);
            }
        }
    }
}

// Element (gm, gn) of C at c[idx], and its activation when the product is
// activated.
fn store(idx: u32, gm: u32, gn: u32, product: f32) {
    let v = epilogue(idx, gm, gn, product);
    c[idx] = v;
    {{ACT_STORE}}
}

// Feature gn of row gm of a gated product: its gate at c[idx], its up at
// c[idx + p.n], and act(gate) * up in `keys`.
fn store_gated(idx: u32, gm: u32, gn: u32, gate_product: f32, up_product: f32) {
    let g = epilogue(idx, gm, gn, gate_product);
    let u = epilogue(idx + p.n, gm, gn + p.n, up_product);
    c[idx] = g;
    c[idx + p.n] = u;
    {{GATED_STORE}}
}

// Rows of A that `matmul_rows` handles: products with this few rows (one
// token per sequence when decoding, the last rows of a prompt) would leave
// all but a few rows of every 64x64 tile empty.
const FEW_ROWS: u32 = 8u;

// op(A)[m, k] for m < p.m, A not transposed; zero for m >= p.m.
fn a_row_at(a_base: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m) {
        return 0.0;
    }
    return load_a(a_base + m * p.lda + k);
}

// C = alpha * A * op(B) + beta * C for at most FEW_ROWS rows of A (not
// transposed): each invocation owns one column of C (GATED: one feature,
// its gate and up columns) and walks k once, reading each element of B
// once for all rows, with no tile padding.
@compute @workgroup_size(64, 1, 1)
fn matmul_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if (n >= p.n) {
        return;
    }
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    var up_lo = vec4<f32>(0.0);
    var up_hi = vec4<f32>(0.0);
    for (var k = 0u; k < p.k; k++) {
        let bv = vec4<f32>(b_load(p.b_off, k, n));
        let a_lo = vec4<f32>(a_row_at(p.a_off, 0u, k), a_row_at(p.a_off, 1u, k), a_row_at(p.a_off, 2u, k), a_row_at(p.a_off, 3u, k));
        lo = fma(a_lo, bv, lo);
        var a_hi = vec4<f32>(0.0);
        if (p.m > 4u) {
            a_hi = vec4<f32>(a_row_at(p.a_off, 4u, k), a_row_at(p.a_off, 5u, k), a_row_at(p.a_off, 6u, k), a_row_at(p.a_off, 7u, k));
            hi = fma(a_hi, bv, hi);
        }
        if (GATED) {
            let uv = vec4<f32>(b_load(p.b_off, k, n + p.n));
            up_lo = fma(a_lo, uv, up_lo);
            up_hi = fma(a_hi, uv, up_hi);
        }
    }
    for (var i = 0u; i < FEW_ROWS; i++) {
        if (i < p.m) {
            let idx = p.c_off + i * p.ldc + n;
            var v: f32;
            var u: f32;
            if (i < 4u) {
                v = lo[i];
                u = up_lo[i];
            } else {
                v = hi[i - 4u];
                u = up_hi[i - 4u];
            }
            if (GATED) {
                store_gated(idx, i, n, v, u);
            } else {
                store(idx, i, n, v);
            }
        }
    }
}

// Tokens per slab of the syrk: each slab's partial sums are added to the
// running sums with Kahan compensation, so f32 rounding stays at the level
// of a 64-term sum however many tokens one call covers.
const SYRK_SLAB: u32 = 64u;

// a − b where the compiler cannot see through it: drivers may simplify
// (s + y) − s to y, which erases a compensation; xor with a uniform zero
// hides that identity.
fn opaque_sub(a: f32, b: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(a) ^ p.opaque_zero) - b;
}

fn opaque_sub4(a: vec4<f32>, b: vec4<f32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(bitcast<vec4<u32>>(a) ^ vec4<u32>(p.opaque_zero)) - b;
}

// C[rows of this piece, :] += alpha * K[:, piece cols]^T K with Kahan
// summation across slabs and across calls, so long corpus runs keep f32
// sums accurate. Tiles entirely below the diagonal are skipped; `mirror`
// fills them later.
@compute @workgroup_size(8, 8, 1)
fn syrk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    if (col0 + TILE_N <= p.row_base + row0) {
        return;
    }
    var sum: array<vec4<f32>, 16>;
    var comp: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += SYRK_SLAB) {
        let acc = accumulate_tile_range(row0, col0, p.a_off, p.b_off, li, lid, k0, min(k0 + SYRK_SLAB, p.k));
        for (var i = 0u; i < 16u; i++) {
            let y = acc[i] - comp[i];
            let t = sum[i] + y;
            comp[i] = vec4<f32>(opaque_sub(t.x, sum[i].x), opaque_sub(t.y, sum[i].y), opaque_sub(t.z, sum[i].z), opaque_sub(t.w, sum[i].w)) - y;
            sum[i] = t;
        }
    }
    for (var i = 0u; i < 8u; i++) {
        let gm = row0 + 8u * lid.y + i;
        for (var j = 0u; j < 8u; j++) {
            let gn = col0 + 8u * lid.x + j;
            if (gm < p.m && gn < p.n) {
                let idx = p.c_off + gm * p.ldc + gn;
                let at = 2u * i + j / 4u;
                let y = p.alpha * (sum[at][j % 4u] - comp[at][j % 4u]) - comp_c[idx];
                let s = c[idx];
                let t = s + y;
                comp_c[idx] = opaque_sub(t, s) - y;
                c[idx] = t;
            }
        }
    }
}

// For rows r of the destination piece (global row row_base + r) and columns
// j of the source piece (global rows k .. k + n of C, m = piece rows):
// C[row, j] = C[j, row] wherever j < row.
@compute @workgroup_size(16, 16, 1)
fn mirror(@builtin(global_invocation_id) gid: vec3<u32>) {
    let at = mirror_indices(gid);
    if (at.x != NOTHING) {
        c[at.x] = extra[at.y];
    }
}

// The same when the source rows share C's buffer: WebGPU forbids binding a
// buffer writably twice, so they are read through `c` itself (the reads
// are above the diagonal, the writes below).
@compute @workgroup_size(16, 16, 1)
fn mirror_within(@builtin(global_invocation_id) gid: vec3<u32>) {
    let at = mirror_indices(gid);
    if (at.x != NOTHING) {
        c[at.x] = c[at.y];
    }
}

const NOTHING: u32 = 0xffffffffu;

// (destination in c, source) of this invocation's lower-triangle element,
// or NOTHING outside the piece or on and above the diagonal.
fn mirror_indices(gid: vec3<u32>) -> vec2<u32> {
    let r = gid.y;
    let j = gid.x;
    let row = p.row_base + r;
    let col = p.k + j;
    if (r >= p.m || j >= p.n || col >= row) {
        return vec2<u32>(NOTHING, 0u);
    }
    return vec2<u32>(p.c_off + r * p.ldc + col, p.a_off + j * p.ldc + row);
}

// C = alpha * A * op(B) + beta * C (A not transposed) for CPU adapters
// (lavapipe, SwiftShader), which run workgroup barriers as fibre switches and
// workgroup memory as plain memory: no barriers, operands read straight from
// storage. Each invocation owns a 4x4 block of C (GATED: two features, their
// gate and up columns) and reads k four at a time. An f16 B is read a word
// (two values) per load, so the host picks this kernel for f16 B only with
// an even offset and row stride (and, B not transposed, N a multiple of 4).
// Rows and columns past the matrix repeat its last one, so no load needs a
// bounds check; their results are not stored. It also serves the blocked
// solver's views (lower_only included).
@compute @workgroup_size(64, 1, 1)
fn matmul_direct(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m0 = gid.y * 4u;
    // The first of this invocation's four columns of C (GATED: features).
    let n0 = gid.x * select(4u, 2u, GATED);
    if (m0 >= p.m || n0 >= p.n) {
        return;
    }
    if (above_diagonal(m0, n0, 4u)) {
        return;
    }
    let last_row = p.m - 1u;
    let ra0 = p.a_off + m0 * p.lda;
    let ra1 = p.a_off + min(m0 + 1u, last_row) * p.lda;
    let ra2 = p.a_off + min(m0 + 2u, last_row) * p.lda;
    let ra3 = p.a_off + min(m0 + 3u, last_row) * p.lda;
    // The four columns of op(B): GATED, features n0 and n0 + 1, gate then up.
    let last_col = p.n - 1u;
    var cols = vec4<u32>(n0, min(n0 + 1u, last_col), min(n0 + 2u, last_col), min(n0 + 3u, last_col));
    if (GATED) {
        cols = vec4<u32>(n0, min(n0 + 1u, last_col), n0 + p.n, min(n0 + 1u, last_col) + p.n);
    }
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    let k4 = p.k & ~3u;
    if (TRANS_B) {
        // Row j of B holds column j of op(B): four k at a time along it.
        let rb = p.b_off + cols * p.ldb;
        for (var k = 0u; k < k4; k += 4u) {
            let b0 = b_run4(rb.x + k);
            let b1 = b_run4(rb.y + k);
            let b2 = b_run4(rb.z + k);
            let b3 = b_run4(rb.w + k);
            c0 += dots4(a_run4(ra0 + k), b0, b1, b2, b3);
            c1 += dots4(a_run4(ra1 + k), b0, b1, b2, b3);
            c2 += dots4(a_run4(ra2 + k), b0, b1, b2, b3);
            c3 += dots4(a_run4(ra3 + k), b0, b1, b2, b3);
        }
    } else {
        // Row k of B holds op(B)[k, :]: the four columns side by side.
        for (var k = 0u; k < k4; k += 4u) {
            let b0 = b_cols4(k, cols);
            let b1 = b_cols4(k + 1u, cols);
            let b2 = b_cols4(k + 2u, cols);
            let b3 = b_cols4(k + 3u, cols);
            c0 += combine4(a_run4(ra0 + k), b0, b1, b2, b3);
            c1 += combine4(a_run4(ra1 + k), b0, b1, b2, b3);
            c2 += combine4(a_run4(ra2 + k), b0, b1, b2, b3);
            c3 += combine4(a_run4(ra3 + k), b0, b1, b2, b3);
        }
    }
    for (var k = k4; k < p.k; k++) {
        let bv = vec4<f32>(b_load(p.b_off, k, cols.x), b_load(p.b_off, k, cols.y), b_load(p.b_off, k, cols.z), b_load(p.b_off, k, cols.w));
        c0 = fma(vec4<f32>(load_a(ra0 + k)), bv, c0);
        c1 = fma(vec4<f32>(load_a(ra1 + k)), bv, c1);
        c2 = fma(vec4<f32>(load_a(ra2 + k)), bv, c2);
        c3 = fma(vec4<f32>(load_a(ra3 + k)), bv, c3);
    }
    store_direct_row(m0, n0, c0);
    store_direct_row(m0 + 1u, n0, c1);
    store_direct_row(m0 + 2u, n0, c2);
    store_direct_row(m0 + 3u, n0, c3);
}

// Elements i .. i + 3 of A.
fn a_run4(i: u32) -> vec4<f32> {
    return vec4<f32>(load_a(i), load_a(i + 1u), load_a(i + 2u), load_a(i + 3u));
}

// Elements i .. i + 3 of B (i even when B is f16).
fn b_run4(i: u32) -> vec4<f32> {
    if (B_F16) {
        return vec4<f32>(unpack2x16float(b[i >> 1u]), unpack2x16float(b[(i >> 1u) + 1u]));
    }
    return vec4<f32>(bitcast<f32>(b[i]), bitcast<f32>(b[i + 1u]), bitcast<f32>(b[i + 2u]), bitcast<f32>(b[i + 3u]));
}

// op(B)[k, cols] for B not transposed: consecutive columns when B is f16.
fn b_cols4(k: u32, cols: vec4<u32>) -> vec4<f32> {
    let row = p.b_off + k * p.ldb;
    if (B_F16) {
        return b_run4(row + cols.x);
    }
    return vec4<f32>(bitcast<f32>(b[row + cols.x]), bitcast<f32>(b[row + cols.y]), bitcast<f32>(b[row + cols.z]), bitcast<f32>(b[row + cols.w]));
}

// (a·b0, a·b1, a·b2, a·b3): a row of A times four columns of op(B).
fn dots4(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
}

// Σ_t a[t] * bt: four k of a row of A times those rows of op(B).
fn combine4(a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.x), b0, fma(vec4<f32>(a.y), b1, fma(vec4<f32>(a.z), b2, vec4<f32>(a.w) * b3)));
}

// Row gm of this invocation's block: columns n0 .. n0 + 3, or (GATED)
// features n0 and n0 + 1 with their gate in v.x, v.y and up in v.z, v.w.
fn store_direct_row(gm: u32, n0: u32, v: vec4<f32>) {
    if (gm >= p.m) {
        return;
    }
    let row = p.c_off + gm * p.ldc;
    if (GATED) {
        store_gated(row + n0, gm, n0, v.x, v.z);
        if (n0 + 1u < p.n) {
            store_gated(row + n0 + 1u, gm, n0 + 1u, v.y, v.w);
        }
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (n0 + j < p.n) {
            store(row + n0 + j, gm, n0 + j, v[j]);
        }
    }
}

// matmul_wide's views of A, B and C four values at a time (the host binds
// the operands' buffers here instead of at bindings 1, 2 and 3): A f32, B
// f32 as vec4<f32> or f16 as vec2<u32>, C f32.
@group(0) @binding(8) var<storage, read> a_quads: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> b_quads: array<{{B_QUAD}}>;
@group(0) @binding(10) var<storage, read_write> c_quads: array<vec4<f32>>;
// The syrk's compensation, four values at a time (WIDE_SYRK).
@group(0) @binding(11) var<storage, read_write> comp_quads: array<vec4<f32>>;

// Elements i .. i + 3 of B (i a multiple of 4).
fn b_quad(i: u32) -> vec4<f32> {
    {{B_QUAD_LOAD}}
}

const WIDE_ROWS: u32 = 32u;
const WIDE_COLS: u32 = 32u;
// beta != 0: the product is added to beta * C.
const WIDE_BETA: bool = {{WIDE_BETA}};
// The product has epilogue terms or an activation: a second pass over the
// block adds them.
const WIDE_FINISH: bool = {{WIDE_FINISH}};
// The product is the syrk's KᵀK over one slab of tokens (A = Kᵀ, B = K):
// blocks wholly below the diagonal are skipped, and each value is added to
// C with Kahan compensation (comp_quads, in WIDE_SYRK_PUT).
const WIDE_SYRK: bool = {{WIDE_SYRK}};

// C = alpha * op(A) * op(B) + beta * C (A f32) for lavapipe,
// which runs each invocation's loads lane by lane (a bounds check and a
// branch per value) while its multiply-adds run eight lanes at once: so
// each invocation owns a 32x32 block of C and loads 64 vectors of four
// values per 4,096 multiply-adds (the 64x64 tiles' 8x8 blocks load one per
// 16 through workgroup memory and barriers). The host picks it only where
// A's, B's and C's offsets and row strides, K and N (and M, A transposed)
// are whole groups of four and the buffers end on a whole group. The
// block's statements are unrolled by the host for the layouts of A and B
// (WIDE_BLOCK: named accumulators, no dynamically indexed array, one store
// of four values per accumulator; lavapipe spends seconds compiling every
// load or store outside a loop, so the epilogue's terms run in a loop over
// the stored block); modules made for other entry points leave it empty.
// Rows and columns past the matrix repeat its last one, so loads need no
// bounds check; their results are not stored. Blocks run along the rows of C; the grid may be 2-D. It
// also serves the blocked solver's views (lower_only included).
@compute @workgroup_size(64, 1, 1)
fn matmul_wide(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    // Columns of C per block: a gated product's block holds WIDE_FEATURES
    // features, their gate and their up columns.
    let block_cols = select(WIDE_COLS, WIDE_FEATURES, GATED);
    let col_blocks = (p.n + block_cols - 1u) / block_cols;
    let block = gid.y * groups.x * 64u + gid.x;
    let m0 = block / col_blocks * WIDE_ROWS;
    let n0 = block % col_blocks * block_cols;
    if (m0 >= p.m) {
        return;
    }
    // A block wholly above the diagonal of a lower-triangle C, or wholly
    // below it in the syrk's upper-triangle C (rows from p.row_base on).
    if (above_diagonal(m0, n0, WIDE_ROWS)) {
        return;
    }
    if (WIDE_SYRK && n0 + WIDE_COLS <= p.row_base + m0) {
        return;
    }
    let last_row = p.m - 1u;
    {{WIDE_BLOCK}}
    if (!WIDE_FINISH) {
        return;
    }
    for (var i = 0u; i < WIDE_ROWS; i++) {
        let gm = m0 + i;
        if (gm >= p.m) {
            break;
        }
        for (var first = n0; first < n0 + block_cols && first < p.n; first += 4u) {
            let q = (p.c_off + gm * p.ldc + first) / 4u;
            var quad = c_quads[q];
            if (GATED) {
                // Features first .. first + 3: their gate here, their up
                // p.n columns on.
                let up_q = q + p.n / 4u;
                var up_quad = c_quads[up_q];
                for (var j = 0u; j < 4u; j++) {
                    var gn = first + j;
                    var v = quad[j];
                    {{EPILOGUE_TERMS}}
                    quad[j] = v;
                    let g = v;
                    gn += p.n;
                    v = up_quad[j];
                    {{EPILOGUE_TERMS}}
                    up_quad[j] = v;
                    let u = v;
                    gn = first + j;
                    {{GATED_STORE}}
                }
                c_quads[up_q] = up_quad;
            } else {
                for (var j = 0u; j < 4u; j++) {
                    let gn = first + j;
                    var v = quad[j];
                    {{EPILOGUE_TERMS}}
                    quad[j] = v;
                    {{ACT_STORE}}
                }
            }
            c_quads[q] = quad;
        }
    }
}

// Features per gated block: their gate columns are block columns
// 0 .. WIDE_FEATURES - 1, their up columns the rest.
const WIDE_FEATURES: u32 = WIDE_COLS / 2u;

// The column of C (B transposed: the row of B) that block column c of the
// block at n0 stands for, with its feature (or plain column) clamped to
// `last`: p.n - 1 where columns are read one by one, p.n - 4 where B's rows
// are read four columns at a time.
fn wide_col(n0: u32, c: u32, last: u32) -> u32 {
    return min(wide_feature(n0, c), last) + wide_up(c);
}

// The feature (plain products: the column) of block column c.
fn wide_feature(n0: u32, c: u32) -> u32 {
    return n0 + select(c, c % WIDE_FEATURES, GATED);
}

// How far right of its feature block column c lies: p.n for a gated
// product's up columns, else 0.
fn wide_up(c: u32) -> u32 {
    return select(0u, p.n, GATED && c >= WIDE_FEATURES);
}

// alpha * acc (+ beta * C; the syrk's: Kahan-added) into row gm of C at
// block columns c .. c + 3 of the block at n0, when they are inside it.
fn wide_put(gm: u32, n0: u32, c: u32, acc: vec4<f32>) {
    let first = wide_feature(n0, c);
    if (gm >= p.m || first >= p.n) {
        return;
    }
    let q = (p.c_off + gm * p.ldc + first + wide_up(c)) / 4u;
    // The syrk's compensated store and return (spliced in as code, so
    // other products do not bind comp_quads).
    {{WIDE_SYRK_PUT}}
    if (WIDE_BETA) {
        c_quads[q] = p.alpha * acc + p.beta * c_quads[q];
    } else {
        c_quads[q] = p.alpha * acc;
    }
}

// GPUs' kernel for large products: a 16x16 workgroup owns a 128x128 tile
// of C, each invocation an 8x8 block of it (rows 4*ly .. 4*ly + 3 and
// 64 + 4*ly .., columns 4*lx .. and 64 + 4*lx .., so the reads of the
// staged slices below fall on consecutive vec4s: no bank conflicts) in 16
// named vec4 accumulators (BIG_BLOCK, unrolled by the host). Per step of
// BIG_K = 8 along k, each invocation loads four values of op(A) and four
// of op(B) (consecutive invocations reading consecutive addresses in both
// layouts) into registers while the slices staged in workgroup memory are
// multiplied, so loads and arithmetic overlap: 8 loads and 32 vec4 reads
// per 512 multiply-adds. Slices have a row stride of 33 vec4s so the
// transposing stores of a k-contiguous operand hit distinct banks.
const BIG: u32 = 128u;
const BIG_K: u32 = 8u;
const BIG_LD: u32 = 33u;

var<workgroup> big_a: array<vec4<f32>, 264>;  // [BIG_K][BIG_LD] of 4 rows
var<workgroup> big_b: array<vec4<f32>, 264>;  // [BIG_K][BIG_LD] of 4 columns

// Column n (0..127) of this tile of op(B) at k. GATED: groups of four
// columns 0..15 are gates, 16..31 the ups of the same 64 features, so an
// invocation's low and high columns are one feature's gate and up.
fn big_b_at(b_base: u32, k: u32, col0: u32, n: u32) -> f32 {
    if (GATED) {
        let g = n / 4u;
        return gated_b_at(b_base, k, col0 / 2u + 4u * (g % 16u) + n % 4u, (g / 16u) * p.n);
    }
    return b_at(b_base, k, col0 + n);
}

// This invocation's four values of op(A)'s slice at k0: A transposed
// (stored [K, M]), four consecutive rows at one k; else one k of four
// rows 32 apart.
fn big_fetch_a(a_base: u32, row0: u32, k0: u32, li: u32) -> vec4<f32> {
    if (TRANS_A) {
        let k = k0 + li / 32u;
        let m = row0 + 4u * (li % 32u);
        return vec4<f32>(a_at(a_base, m, k), a_at(a_base, m + 1u, k), a_at(a_base, m + 2u, k), a_at(a_base, m + 3u, k));
    }
    let k = k0 + li % 8u;
    let m = row0 + li / 8u;
    return vec4<f32>(a_at(a_base, m, k), a_at(a_base, m + 32u, k), a_at(a_base, m + 64u, k), a_at(a_base, m + 96u, k));
}

// The same for op(B): B transposed (stored [N, K]) is k-contiguous.
fn big_fetch_b(b_base: u32, col0: u32, k0: u32, li: u32) -> vec4<f32> {
    if (TRANS_B) {
        let k = k0 + li % 8u;
        let n = li / 8u;
        return vec4<f32>(big_b_at(b_base, k, col0, n), big_b_at(b_base, k, col0, n + 32u), big_b_at(b_base, k, col0, n + 64u), big_b_at(b_base, k, col0, n + 96u));
    }
    let k = k0 + li / 32u;
    let n = 4u * (li % 32u);
    return vec4<f32>(big_b_at(b_base, k, col0, n), big_b_at(b_base, k, col0, n + 1u), big_b_at(b_base, k, col0, n + 2u), big_b_at(b_base, k, col0, n + 3u));
}

// Stages fetched values where `big_fetch_a` / `big_fetch_b` took them from.
fn big_stage(ra: vec4<f32>, rb: vec4<f32>, li: u32) {
    if (TRANS_A) {
        big_a[(li / 32u) * BIG_LD + li % 32u] = ra;
    } else {
        let at = (li % 8u) * BIG_LD + (li / 8u) / 4u;
        let lane = (li / 8u) % 4u;
        big_a[at][lane] = ra.x;
        big_a[at + 8u][lane] = ra.y;
        big_a[at + 16u][lane] = ra.z;
        big_a[at + 24u][lane] = ra.w;
    }
    if (TRANS_B) {
        let at = (li % 8u) * BIG_LD + (li / 8u) / 4u;
        let lane = (li / 8u) % 4u;
        big_b[at][lane] = rb.x;
        big_b[at + 8u][lane] = rb.y;
        big_b[at + 16u][lane] = rb.z;
        big_b[at + 24u][lane] = rb.w;
    } else {
        big_b[(li / 32u) * BIG_LD + li % 32u] = rb;
    }
}

// Row gm of this invocation's block: columns col0 + 4 * lx + j (lo) and
// 64 further (hi); GATED, feature col0 / 2 + 4 * lx + j's gate and up.
fn big_put_row(c_base: u32, gm: u32, col0: u32, lx: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if (gm >= p.m) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        if (GATED) {
            let gn = col0 / 2u + 4u * lx + j;
            if (gn < p.n) {
                store_gated(c_base + gm * p.ldc + gn, gm, gn, lo[j], hi[j]);
            }
        } else {
            let gn = col0 + 4u * lx + j;
            if (gn < p.n) {
                store(c_base + gm * p.ldc + gn, gm, gn, lo[j]);
            }
            if (gn + 64u < p.n) {
                store(c_base + gm * p.ldc + gn + 64u, gm, gn + 64u, hi[j]);
            }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn matmul_big(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * BIG;
    let col0 = wid.x * BIG;
    if (above_diagonal(row0, col0, BIG)) {
        return;
    }
    let a_base = p.a_off;
    let b_base = p.b_off;
    // Split K: slab wid.z of the partial sums covers k in [k_begin, k_end).
    let k_begin = wid.z * p.k_split;
    let k_end = select(p.k, min(p.k, k_begin + p.k_split), p.k_split != 0u);
    let c_base = p.c_off + wid.z * p.part_stride;
    let lx = lid.x;
    let ly = lid.y;
    {{BIG_BLOCK}}
}

// C = epilogue(sum of the split-K partial slabs) for one element of C
// (GATED: one feature, its gate in partial column gn and its up in
// gn + p.n), so a split product keeps its bias, residual and activation.
@compute @workgroup_size(64, 1, 1)
fn matmul_split_sum(@builtin(global_invocation_id) gid: vec3<u32>) {
    let gn = gid.x;
    let gm = gid.y;
    if (gm >= p.m || gn >= p.n) {
        return;
    }
    var v = 0.0;
    var u = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let at = p.part_off + s * p.part_stride + gm * p.part_ld + gn;
        v += partials[at];
        if (GATED) {
            u += partials[at + p.n];
        }
    }
    let idx = p.c_off + gm * p.ldc + gn;
    if (GATED) {
        store_gated(idx, gm, gn, v, u);
    } else {
        store(idx, gm, gn, v);
    }
}
