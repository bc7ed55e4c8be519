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

const TRANS_A: bool = {{TRANS_A}};
const TRANS_B: bool = {{TRANS_B}};
const A_F16: bool = {{A_F16}};
const B_F16: bool = {{B_F16}};

const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;

struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    lda: u32, ldb: u32, ldc: u32, row_base: u32,
    a_off: u32, b_off: u32, c_off: u32, opaque_zero: u32,
    a_bstride: u32, b_bstride: u32, c_bstride: u32, _pad1: u32,
    alpha: f32, beta: f32, _pad2: u32, _pad3: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> b: array<u32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
// Kahan compensation terms of C (syrk only).
@group(0) @binding(4) var<storage, read_write> comp: array<f32>;
// Source rows for the mirror step when they are in another buffer than c.
@group(0) @binding(5) var<storage, read> mirror_src: array<f32>;

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
    if (TRANS_B) {
        return load_b(b_base + n * p.ldb + k);
    }
    return load_b(b_base + k * p.ldb + n);
}

// Accumulates this invocation's 8x8 block of op(A)[row0.., :] * op(B)[:, col0..]:
// element (i, 4*h + j) of the block is acc[2*i + h][j].
fn accumulate_tile(row0: u32, col0: u32, a_base: u32, b_base: u32, li: u32, lid: vec3<u32>) -> array<vec4<f32>, 16> {
    var acc: array<vec4<f32>, 16>;
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        // Invocation li stages vec4s li, li + 64, li + 128, li + 192 of each
        // slice: 4 consecutive rows of A / columns of B at one k.
        for (var r = 0u; r < 4u; r++) {
            let v = li + 64u * r;
            let k = k0 + v / 16u;
            let m = row0 + 4u * (v % 16u);
            tile_a[v] = vec4<f32>(a_at(a_base, m, k), a_at(a_base, m + 1u, k), a_at(a_base, m + 2u, k), a_at(a_base, m + 3u, k));
            let n = col0 + 4u * (v % 16u);
            tile_b[v] = vec4<f32>(b_at(b_base, k, n), b_at(b_base, k, n + 1u), b_at(b_base, k, n + 2u), b_at(b_base, k, n + 3u));
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

@compute @workgroup_size(8, 8, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    let acc = accumulate_tile(row0, col0, p.a_off + wid.z * p.a_bstride, p.b_off + wid.z * p.b_bstride, li, lid);
    let c_base = p.c_off + wid.z * p.c_bstride;
    for (var i = 0u; i < 8u; i++) {
        let gm = row0 + 8u * lid.y + i;
        for (var j = 0u; j < 8u; j++) {
            let gn = col0 + 8u * lid.x + j;
            if (gm < p.m && gn < p.n) {
                let idx = c_base + gm * p.ldc + gn;
                var v = p.alpha * acc[2u * i + j / 4u][j % 4u];
                if (p.beta != 0.0) {
                    v += p.beta * c[idx];
                }
                c[idx] = v;
            }
        }
    }
}

// C[rows of this piece, :] += alpha * K[:, piece cols]^T K with Kahan
// summation across calls, so long corpus runs keep f32 sums accurate.
// Tiles entirely below the diagonal are skipped; `mirror` fills them later.
@compute @workgroup_size(8, 8, 1)
fn syrk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    if (col0 + TILE_N <= p.row_base + row0) {
        return;
    }
    let acc = accumulate_tile(row0, col0, p.a_off, p.b_off, li, lid);
    for (var i = 0u; i < 8u; i++) {
        let gm = row0 + 8u * lid.y + i;
        for (var j = 0u; j < 8u; j++) {
            let gn = col0 + 8u * lid.x + j;
            if (gm < p.m && gn < p.n) {
                let idx = p.c_off + gm * p.ldc + gn;
                let y = p.alpha * acc[2u * i + j / 4u][j % 4u] - comp[idx];
                let s = c[idx];
                let t = s + y;
                // Drivers may simplify (s + y) - s to y, which erases the
                // compensation; xor with a uniform zero hides that identity.
                let t_opaque = bitcast<f32>(bitcast<u32>(t) ^ p.opaque_zero);
                comp[idx] = (t_opaque - s) - y;
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
        c[at.x] = mirror_src[at.y];
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
