// Matrix products: C = alpha * op(A) * op(B) + beta * C (batched over z),
// the syrk-style covariance accumulate C += alpha * K^T K, and the mirror of
// an upper triangle into the lower one.
//
// A 16x16 workgroup owns a 64x64 tile of C. Each invocation keeps a 4x4
// register block: rows ly + 16*i (i < 4) and the 4 contiguous columns
// 4*lx .. 4*lx+3, held as one vec4 per row. Per step along k, a 64x16 tile of
// op(A) and a 16x64 tile of op(B) are staged in workgroup memory (8 KiB).
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
// Source rows for the mirror step (may be the same buffer as c).
@group(0) @binding(5) var<storage, read_write> mirror_src: array<f32>;

var<workgroup> tile_a: array<f32, 1024>;       // [TILE_K][TILE_M]
var<workgroup> tile_b: array<vec4<f32>, 256>;  // [TILE_K][TILE_N / 4]
var<private> acc: array<vec4<f32>, 4>;

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

// Accumulates op(A)[row0.., :] * op(B)[:, col0..] into `acc`.
fn accumulate_tile(row0: u32, col0: u32, a_base: u32, b_base: u32, li: u32, lid: vec3<u32>) {
    for (var i = 0u; i < 4u; i++) {
        acc[i] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        for (var r = 0u; r < 4u; r++) {
            let l = li + r * 256u;
            // Consecutive invocations read consecutive addresses of A and B.
            var mm: u32;
            var ka: u32;
            if (TRANS_A) { ka = l / TILE_M; mm = l % TILE_M; } else { mm = l / TILE_K; ka = l % TILE_K; }
            let gm = row0 + mm;
            let gka = k0 + ka;
            var va = 0.0;
            if (gm < p.m && gka < p.k) {
                if (TRANS_A) { va = load_a(a_base + gka * p.lda + gm); } else { va = load_a(a_base + gm * p.lda + gka); }
            }
            tile_a[ka * TILE_M + mm] = va;

            var nn: u32;
            var kb: u32;
            if (TRANS_B) { nn = l / TILE_K; kb = l % TILE_K; } else { kb = l / TILE_N; nn = l % TILE_N; }
            let gn = col0 + nn;
            let gkb = k0 + kb;
            var vb = 0.0;
            if (gn < p.n && gkb < p.k) {
                if (TRANS_B) { vb = load_b(b_base + gn * p.ldb + gkb); } else { vb = load_b(b_base + gkb * p.ldb + gn); }
            }
            tile_b[kb * (TILE_N / 4u) + nn / 4u][nn % 4u] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let bv = tile_b[kk * (TILE_N / 4u) + lid.x];
            for (var i = 0u; i < 4u; i++) {
                acc[i] = fma(vec4<f32>(tile_a[kk * TILE_M + lid.y + 16u * i]), bv, acc[i]);
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    accumulate_tile(row0, col0, p.a_off + wid.z * p.a_bstride, p.b_off + wid.z * p.b_bstride, li, lid);
    let c_base = p.c_off + wid.z * p.c_bstride;
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + 4u * lid.x + j;
            if (gm < p.m && gn < p.n) {
                let idx = c_base + gm * p.ldc + gn;
                var v = p.alpha * acc[i][j];
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
@compute @workgroup_size(16, 16, 1)
fn syrk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let row0 = wid.y * TILE_M;
    let col0 = wid.x * TILE_N;
    if (col0 + TILE_N <= p.row_base + row0) {
        return;
    }
    accumulate_tile(row0, col0, p.a_off, p.b_off, li, lid);
    for (var i = 0u; i < 4u; i++) {
        let gm = row0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j++) {
            let gn = col0 + 4u * lid.x + j;
            if (gm < p.m && gn < p.n) {
                let idx = p.c_off + gm * p.ldc + gn;
                let y = p.alpha * acc[i][j] - comp[idx];
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
    let r = gid.y;
    let j = gid.x;
    if (r >= p.m || j >= p.n) {
        return;
    }
    let row = p.row_base + r;
    let col = p.k + j;
    if (col < row) {
        c[p.c_off + r * p.ldc + col] = mirror_src[p.a_off + j * p.ldc + row];
    }
}
