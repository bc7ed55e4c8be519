//! C = alpha * op(A) op(B) + beta * C, the syrk covariance accumulate and the
//! triangle mirror, over chunked operands.

use bytemuck::{Pod, Zeroable};

use super::activation::Activation;
use super::{require_f32, u32_of};
use crate::context::{grid_1d, GpuContext, Kernel, SplitK};
use crate::runtime::Work;
use crate::error::{GpuError, Result};
use crate::shader::{defined_true, flag, ShaderFamily};
use crate::tensor::{chunk_spans, DType, Tensor, PooledBuffer};

const TILE: usize = 64;
/// At most this many rows of A (not transposed) go to `matmul_rows`, one
/// invocation per column of C, instead of 64x64 tiles.
const FEW_ROWS: usize = 8;
/// Columns per `matmul_rows` workgroup.
const ROWS_GROUP: usize = 64;
/// Invocations per `matmul_direct` workgroup (along the columns of C).
const DIRECT_GROUP: usize = 64;
/// Rows and columns of C per `matmul_wide` invocation (WIDE_ROWS and
/// WIDE_COLS in the shader), and its invocations per workgroup.
const WIDE_ROWS: usize = 32;
const WIDE_COLS: usize = 32;
const WIDE_GROUP: usize = 64;
/// Rows and columns of C per `matmul_big` workgroup (BIG in the shader),
/// and its step along k (BIG_K).
const BIG_TILE: usize = 128;
const BIG_K: usize = 8;
/// Invocations per `matmul_split_sum` workgroup (along the columns of C).
const SPLIT_SUM_GROUP: usize = 64;
/// Products of at most FEW_ROWS rows take `matmul_big` instead of
/// `matmul_rows` (one invocation walking all of K per column) on GPUs from
/// this K on, where they are split along K: an unembedding's backward
/// (K = vocabulary).
const FEW_ROWS_SPLIT_K: usize = 4096;

/// Tokens per `matmul_wide` dispatch of the syrk: each slab's f32 sums are
/// Kahan-added to C, so rounding stays at the level of a 256-term sum (the
/// tiles' slabs: 64) while the compensated store adds about a quarter to
/// the slab's loads.
const WIDE_SYRK_SLAB: usize = 256;
/// `wide_put`'s store for the syrk: alpha·acc Kahan-added to C.
const WIDE_SYRK_PUT: &str = "let y = p.alpha * acc - comp_quads[q];
    let s = c_quads[q];
    let t = s + y;
    comp_quads[q] = opaque_sub4(t, s) - y;
    c_quads[q] = t;
    return;";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    row_base: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    /// Always 0; lets the syrk kernel hide an identity from the compiler.
    opaque_zero: u32,
    a_bstride: u32,
    b_bstride: u32,
    c_bstride: u32,
    lower_only: u32,
    alpha: f32,
    beta: f32,
    col_base: u32,
    add_off: u32,
    add_ld: u32,
    bias_off: u32,
    key_off: u32,
    key_ld: u32,
    k_split: u32,
    splits: u32,
    part_stride: u32,
    part_ld: u32,
    part_off: u32,
}

/// How to combine A and B into C.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulSpec {
    /// Use Aᵀ (A stored [K, M]).
    pub trans_a: bool,
    /// Use Bᵀ (B stored [N, K], the layout of a Linear weight).
    pub trans_b: bool,
    pub alpha: f32,
    /// Weight of the existing C; 0 overwrites without reading C.
    pub beta: f32,
}

impl Default for MatmulSpec {
    fn default() -> Self {
        MatmulSpec { trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }
    }
}

impl MatmulSpec {
    pub fn new(trans_a: bool, trans_b: bool) -> Self {
        MatmulSpec { trans_a, trans_b, ..Default::default() }
    }
}

/// What a product's epilogue adds to alpha·op(A)·op(B) + beta·C, so a
/// layer's bias and residual cost no dispatch of their own.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// One value per column of C ([N]).
    pub bias: Option<&'a Tensor>,
    /// A tensor shaped like C (a residual stream).
    pub residual: Option<&'a Tensor>,
}

/// The activation an MLP's input projection applies in its epilogue, and
/// where the activations go ([M, N], or [M, N/2] for a gated product).
#[derive(Clone, Copy)]
struct Activated<'a> {
    keys: &'a Tensor,
    act: Activation,
    gated: bool,
}

fn defines(spec: &MatmulSpec, a: DType, b: DType) -> Vec<(&'static str, String)> {
    epilogue_defines(spec, a, b, false, false, None)
}

fn epilogue_defines(spec: &MatmulSpec, a: DType, b: DType, addend: bool, bias: bool, activated: Option<(Activation, bool)>) -> Vec<(&'static str, String)> {
    // The stores of the activations are spliced in only where they run, so
    // other products do not bind `keys`.
    let (act_fn, act_store, gated_store) = match activated {
        None => (String::new(), String::new(), String::new()),
        Some((act, gated)) => {
            let store = "keys[p.key_off + gm * p.key_ld + gn] = ";
            let (plain, gate) = if gated { (String::new(), format!("{store}act(g) * u;")) } else { (format!("{store}act(v);"), String::new()) };
            (format!("{}\nfn act(v: f32) -> f32 {{ return {}(v); }}", crate::shader::ACTIVATIONS, act.wgsl_fn()), plain, gate)
        }
    };
    let mut terms = String::new();
    if addend {
        terms.push_str("v += extra[p.add_off + gm * p.add_ld + gn];");
    }
    if bias {
        terms.push_str("v += bias[p.bias_off + gn];");
    }
    vec![
        ("TRANS_A", flag(spec.trans_a)),
        ("TRANS_B", flag(spec.trans_b)),
        ("A_F16", flag(a == DType::F16)),
        ("B_F16", flag(b == DType::F16)),
        ("EPILOGUE_TERMS", terms),
        ("GATED", flag(activated.is_some_and(|(_, gated)| gated))),
        ("ACTIVATION_FN", act_fn),
        ("ACT_STORE", act_store),
        ("GATED_STORE", gated_store),
        ("WIDE_BETA", flag(spec.beta != 0.0)),
        ("WIDE_FINISH", flag(addend || bias || activated.is_some())),
        ("WIDE_SYRK", flag(false)),
        ("WIDE_SYRK_PUT", String::new()),
        ("B_QUAD", if b == DType::F16 { "vec2<u32>" } else { "vec4<f32>" }.into()),
        (
            "B_QUAD_LOAD",
            if b == DType::F16 { "let w = b_quads[i / 4u];\n    return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));" } else { "return b_quads[i / 4u];" }.into(),
        ),
    ]
}

/// The text of a block the host unrolls: `write` is handed a function that
/// appends one line (indented as the kernel body the block is pasted in).
fn unrolled_block(write: impl FnOnce(&mut dyn FnMut(String))) -> String {
    let mut s = String::new();
    write(&mut |text: String| {
        s.push_str(&text);
        s.push_str("\n    ");
    });
    s
}

/// `matmul_wide`'s block (its WIDE_BLOCK) for the layouts of A and B that
/// `defines` (TRANS_A, TRANS_B) give, unrolled here: given loops over an
/// accumulator array, lavapipe takes 30 s to unroll them, and 140 s to
/// compile the array's dynamic indexing in a store loop. One named vec4
/// accumulator per row and four columns, the k loop, and one store of four
/// values per accumulator (about 5 s of lavapipe's compile). Only the one
/// layout's loop (about 1,200 lines each): on lavapipe a pipeline holding
/// all four took 0.3 s to create, one holding its own 0.2 s.
pub(crate) fn wide_block(defines: &[(&'static str, String)]) -> &'static str {
    static CODE: [std::sync::OnceLock<String>; 4] = [const { std::sync::OnceLock::new() }; 4];
    let (trans_a, trans_b) = (defined_true(defines, "TRANS_A"), defined_true(defines, "TRANS_B"));
    CODE[2 * trans_a as usize + trans_b as usize].get_or_init(|| {
        unrolled_block(|line| {
            for r in 0..WIDE_ROWS {
                line((0..WIDE_COLS / 4).map(|g| format!("var c{r}_{g} = vec4<f32>(0.0); ")).collect());
            }
            wide_k_loop(trans_a, trans_b, line);
            for r in 0..WIDE_ROWS {
                line((0..WIDE_COLS / 4).map(|g| format!("wide_put(m0 + {r}u, n0, {}u, c{r}_{g}); ", 4 * g)).collect());
            }
        })
    })
}

/// `matmul_big`'s body (its BIG_BLOCK): 16 named vec4 accumulators, the k
/// loop with each slice's eight steps unrolled, and the stores. One text
/// for every layout: the fetch and stage functions branch on constants.
pub(crate) fn big_block() -> &'static str {
    static CODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        unrolled_block(|line| {
            for r in 0..8 {
                line(format!("var c{r}_0 = vec4<f32>(0.0); var c{r}_1 = vec4<f32>(0.0);"));
            }
            line("var ra = big_fetch_a(a_base, row0, k_begin, li);".into());
            line("var rb = big_fetch_b(b_base, col0, k_begin, li);".into());
            line("for (var k0 = k_begin; k0 < k_end; k0 += BIG_K) {".into());
            line("    workgroupBarrier();".into());
            line("    big_stage(ra, rb, li);".into());
            line("    workgroupBarrier();".into());
            line("    if (k0 + BIG_K < k_end) {".into());
            line("        ra = big_fetch_a(a_base, row0, k0 + BIG_K, li);".into());
            line("        rb = big_fetch_b(b_base, col0, k0 + BIG_K, li);".into());
            line("    }".into());
            for kk in 0..8 {
                let at = kk * 33;
                line(format!("    let a{kk}l = big_a[{at}u + ly]; let a{kk}h = big_a[{}u + ly];", at + 16));
                line(format!("    let b{kk}l = big_b[{at}u + lx]; let b{kk}h = big_b[{}u + lx];", at + 16));
                for r in 0..8 {
                    let (half, lane) = (if r < 4 { "l" } else { "h" }, ["x", "y", "z", "w"][r % 4]);
                    line(format!(
                        "    c{r}_0 = fma(vec4<f32>(a{kk}{half}.{lane}), b{kk}l, c{r}_0); c{r}_1 = fma(vec4<f32>(a{kk}{half}.{lane}), b{kk}h, c{r}_1);"
                    ));
                }
            }
            line("}".into());
            for r in 0..8 {
                let row = if r < 4 { format!("row0 + 4u * ly + {r}u") } else { format!("row0 + 64u + 4u * ly + {}u", r - 4) };
                line(format!("big_put_row(c_base, {row}, col0, lx, c{r}_0, c{r}_1);"));
            }
        })
    })
}

/// The tensor-core kernels' sizes for fragments of `fragment` run by
/// subgroups of `subgroup` invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CoopSizes {
    fragment: usize,
    subgroup: usize,
}

impl CoopSizes {
    pub(crate) fn new(fragment: usize, subgroup: usize) -> CoopSizes {
        CoopSizes { fragment, subgroup }
    }
    /// Rows and columns of C per subgroup (4×4 fragments): `matmul_coop`'s tile.
    fn subgroup_tile(self) -> usize {
        4 * self.fragment
    }
    /// Rows and columns of C per `matmul_coop_staged` workgroup (2×2 subgroups).
    fn workgroup_tile(self) -> usize {
        8 * self.fragment
    }
    /// The staged kernel's step along k.
    fn slab(self) -> usize {
        2 * self.fragment
    }
    /// Row strides of the staged slabs in halves: A's (and a transposed
    /// B's, [N, K]) rows of one slab, and a plain B's rows of the tile's
    /// columns, each padded by 8 halves.
    fn slab_stride(self) -> usize {
        self.slab() + 8
    }
    fn slab_stride_cols(self) -> usize {
        self.workgroup_tile() + 8
    }
    /// 16-byte words of each slab every invocation of the staged kernel
    /// loads, where the workgroup's invocations split the slab evenly.
    fn words_per_invocation(self) -> Option<usize> {
        let words = self.workgroup_tile() * self.slab() / 8;
        let invocations = 4 * self.subgroup;
        words.is_multiple_of(invocations).then_some(words / invocations)
    }
    /// Whether `matmul_coop_staged` can run on a device with `limits`: its
    /// slabs split evenly over its invocations and fit the workgroup
    /// memory, and four subgroups fit one workgroup.
    pub(crate) fn staged_fits(self, limits: &wgpu::Limits) -> bool {
        let (slab_a, slab_b) = self.slab_lengths();
        self.words_per_invocation().is_some()
            && 2 * (slab_a + slab_b) as u64 <= limits.max_compute_workgroup_storage_size as u64
            && 4 * self.subgroup <= limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x) as usize
    }
    /// Halves of the staged kernel's workgroup arrays for A's slab and
    /// B's (sized for either layout of B).
    fn slab_lengths(self) -> (usize, usize) {
        let a = self.workgroup_tile() * self.slab_stride();
        (a, a.max(self.slab() * self.slab_stride_cols()))
    }
    /// The template values the tensor-core module needs besides TRANS_B.
    pub(crate) fn defines(self) -> [(&'static str, String); 4] {
        let (slab_a, slab_b) = self.slab_lengths();
        [
            ("COOP_F", self.fragment.to_string()),
            ("COOP_SG", self.subgroup.to_string()),
            ("COOP_SLAB_A", slab_a.to_string()),
            ("COOP_SLAB_B", slab_b.to_string()),
        ]
    }
    /// The sizes in a tensor-core module's `defines`; None where they are
    /// missing (the template key then stays without a value, an error).
    fn from_defines(defines: &[(&'static str, String)]) -> Option<CoopSizes> {
        let size = |key| defines.iter().find(|(k, _)| *k == key).and_then(|(_, v)| v.parse().ok());
        Some(CoopSizes { fragment: size("COOP_F")?, subgroup: size("COOP_SG")? })
    }
}

/// One generated tensor-core kernel body: which kernel, the layout of B,
/// the sizes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct CoopVariant {
    staged: bool,
    trans_b: bool,
    sizes: CoopSizes,
}

/// The generated bodies of the tensor-core kernels, made once per variant
/// (an adapter has one set of sizes, so a process makes at most four).
fn coop_code(key: CoopVariant, make: impl FnOnce() -> String) -> &'static str {
    static CODE: std::sync::Mutex<Vec<(CoopVariant, &'static str)>> = std::sync::Mutex::new(Vec::new());
    let mut code = CODE.lock().unwrap();
    if let Some(&(_, text)) = code.iter().find(|(k, _)| *k == key) {
        return text;
    }
    let text: &'static str = Box::leak(make().into_boxed_str());
    code.push((key, text));
    text
}

/// Where one subgroup's fragments of A and op(B) are read: the arrays,
/// the index expressions of fragment i's (j's) first element, and the
/// row strides.
struct FragmentSource<'a> {
    arrays: (&'a str, &'a str),
    a_at: &'a dyn Fn(usize) -> String,
    b_at: &'a dyn Fn(usize) -> String,
    strides: (&'a str, &'a str),
}

/// One step along k of a subgroup's 4×4 fragments: the loads of four
/// fragments of A and four of op(B) from `src`, and their 16
/// multiply-adds, in a block of its own. `coopLoadT` reads a row-major
/// fragment, `coopLoad` a column-major one, so a transposed B ([N, K]) is
/// op(B) column-major.
fn coop_step(line: &mut dyn FnMut(String), f: usize, trans_b: bool, src: &FragmentSource<'_>) {
    let ((a_array, b_array), (a_stride, b_stride)) = (src.arrays, src.strides);
    line("    {".into());
    // Every index and stride is a `let` first: naga's SPIR-V writer leaves
    // a cooperative load's or store's operands computed inline in its
    // argument list unemitted.
    for i in 0..4 {
        line(format!("    let ai{i} = {};", (src.a_at)(i)));
        line(format!("    let a{i} = coopLoadT<coop_mat{f}x{f}<f16, A>>(&{a_array}[ai{i}], {a_stride});"));
    }
    for j in 0..4 {
        let load = if trans_b { "coopLoad" } else { "coopLoadT" };
        line(format!("    let bi{j} = {};", (src.b_at)(j)));
        line(format!("    let b{j} = {load}<coop_mat{f}x{f}<f16, B>>(&{b_array}[bi{j}], {b_stride});"));
    }
    for i in 0..4 {
        for j in 0..4 {
            line(format!("    c{i}{j} = coopMultiplyAdd(a{i}, b{j}, c{i}{j});"));
        }
    }
    line("    }".into());
}

/// The 16 accumulators of a subgroup's 4×4 fragments.
fn coop_accumulators(line: &mut dyn FnMut(String), f: usize) {
    for i in 0..4 {
        line((0..4).map(|j| format!("var c{i}{j} = coop_mat{f}x{f}<f32, C>(); ")).collect());
    }
}

/// The stores of the 16 accumulators to C from row `rows`, column `cols`
/// (WGSL names).
fn coop_stores(line: &mut dyn FnMut(String), f: usize, (rows, cols): (&str, &str)) {
    for i in 0..4 {
        for j in 0..4 {
            line(format!("let at{i}{j} = p.c_off + ({rows} + {}u) * ldc + {cols} + {}u;", f * i, f * j));
            line(format!("coopStoreT(c{i}{j}, &c[at{i}{j}], ldc);"));
        }
    }
}

/// `matmul_coop`'s body (its COOP_BLOCK) for the layout of B and the
/// sizes in `defines`: 16 accumulators, the k loop over fragments, the
/// stores. Empty in a module made for the staged kernel.
pub(crate) fn coop_block(entry: &str, defines: &[(&'static str, String)]) -> Option<&'static str> {
    if entry != "matmul_coop" {
        return Some("");
    }
    let trans_b = defined_true(defines, "TRANS_B");
    let sizes = CoopSizes::from_defines(defines)?;
    Some(coop_code(CoopVariant { staged: false, trans_b, sizes }, || {
        let f = sizes.fragment;
        unrolled_block(|line| {
            line(format!("let m0 = wid.y * {}u;", sizes.subgroup_tile()));
            line(format!("let n0 = wid.x * {}u;", sizes.subgroup_tile()));
            line("let lda = p.lda; let ldb = p.ldb; let ldc = p.ldc;".into());
            coop_accumulators(line, f);
            line(format!("for (var k = 0u; k < p.k; k += {f}u) {{"));
            let a_at = |i: usize| format!("p.a_off + (m0 + {}u) * lda + k", f * i);
            let b_at = |j: usize| {
                if trans_b { format!("p.b_off + (n0 + {}u) * ldb + k", f * j) } else { format!("p.b_off + k * ldb + n0 + {}u", f * j) }
            };
            coop_step(line, f, trans_b, &FragmentSource { arrays: ("a", "b"), a_at: &a_at, b_at: &b_at, strides: ("lda", "ldb") });
            line("}".into());
            coop_stores(line, f, ("m0", "n0"));
        })
    }))
}

/// `matmul_coop_staged`'s body (its COOP_STAGED_BLOCK) for the layout of
/// B and the sizes in `defines`. Each invocation owns `words_per_invocation`
/// 16-byte words of each slab at fixed slab coordinates (`ar{w}`/`ac{w}`
/// for A, `br{w}`/`bc{w}` for B); words past K read as zero, so a last
/// slab of one fragment adds nothing from its second half. Empty in a
/// module made for the other kernel.
pub(crate) fn coop_staged_block(entry: &str, defines: &[(&'static str, String)]) -> Option<&'static str> {
    if entry != "matmul_coop_staged" {
        return Some("");
    }
    let trans_b = defined_true(defines, "TRANS_B");
    let sizes = CoopSizes::from_defines(defines)?;
    let words = sizes.words_per_invocation()?;
    Some(coop_code(CoopVariant { staged: true, trans_b, sizes }, || {
        let (f, tile, slab) = (sizes.fragment, sizes.workgroup_tile(), sizes.slab());
        let (stride, stride_cols) = (sizes.slab_stride(), sizes.slab_stride_cols());
        let threads = 4 * sizes.subgroup;
        unrolled_block(|line| {
            line(format!("let m0 = wid.y * {tile}u;"));
            line(format!("let n0 = wid.x * {tile}u;"));
            line("let lda = p.lda; let ldb = p.ldb; let ldc = p.ldc;".into());
            // The subgroup's quarter of the workgroup's tile. Four whole
            // subgroups: the workgroup is 4 × the adapter's one subgroup
            // size (Vulkan promises full subgroups only on request, which
            // wgpu does not make; every driver seen packs them so). The
            // index is clamped to those four: the module runs without
            // runtime checks, and a driver that split the workgroup
            // otherwise must not reach past the slabs or the tile.
            line("let quarter = min(sg, 3u);".into());
            line(format!("let wm = (quarter / 2u) * {}u;", sizes.subgroup_tile()));
            line(format!("let wn = (quarter % 2u) * {}u;", sizes.subgroup_tile()));
            // A slab is `tile` rows of `slab` halves: slab / 8 words a row.
            // A plain B's slab is `slab` rows of `tile` halves.
            let (b_rows_words, b_stride) = if trans_b { (slab / 8, stride) } else { (tile / 8, stride_cols) };
            for w in 0..words {
                line(format!("let q{w} = li + {}u;", w * threads));
                line(format!("let ar{w} = q{w} / {}u; let ac{w} = (q{w} % {}u) * 8u;", slab / 8, slab / 8));
                line(format!("let br{w} = q{w} / {b_rows_words}u; let bc{w} = (q{w} % {b_rows_words}u) * 8u;"));
                line(format!("var wa{w} = mat2x4<f16>(); var wb{w} = mat2x4<f16>();"));
            }
            let load = |line: &mut dyn FnMut(String), k: &str| {
                for w in 0..words {
                    line(format!("if ({k} + ac{w} < p.k) {{ wa{w} = a_words[(p.a_off + (m0 + ar{w}) * lda + {k} + ac{w}) / 8u]; }} else {{ wa{w} = mat2x4<f16>(); }}"));
                    line(if trans_b {
                        format!("if ({k} + bc{w} < p.k) {{ wb{w} = b_words[(p.b_off + (n0 + br{w}) * ldb + {k} + bc{w}) / 8u]; }} else {{ wb{w} = mat2x4<f16>(); }}")
                    } else {
                        format!("if ({k} + br{w} < p.k) {{ wb{w} = b_words[(p.b_off + ({k} + br{w}) * ldb + n0 + bc{w}) / 8u]; }} else {{ wb{w} = mat2x4<f16>(); }}")
                    });
                }
            };
            coop_accumulators(line, f);
            load(line, "0u");
            line(format!("for (var k = 0u; k < p.k; k += {slab}u) {{"));
            line("    workgroupBarrier();".into());
            for w in 0..words {
                line(format!("    let sa{w} = ar{w} * {stride}u + ac{w};"));
                line(format!("    let sb{w} = br{w} * {b_stride}u + bc{w};"));
                // A word's eight halves are its two columns of four.
                for col in 0..2 {
                    for (row, comp) in ["x", "y", "z", "w"].iter().enumerate() {
                        let at = 4 * col + row;
                        line(format!("    slab_a[sa{w} + {at}u] = wa{w}[{col}].{comp}; slab_b[sb{w} + {at}u] = wb{w}[{col}].{comp};"));
                    }
                }
            }
            line("    workgroupBarrier();".into());
            // The next slab's words load while this one is multiplied.
            line(format!("    let next = k + {slab}u;"));
            line("    if (next < p.k) {".into());
            load(&mut |text| line(format!("        {text}")), "next");
            line("    }".into());
            for kk in [0, f] {
                let a_at = move |i: usize| format!("(wm + {}u) * {stride}u + {kk}u", f * i);
                let b_at = move |j: usize| {
                    if trans_b { format!("(wn + {}u) * {stride}u + {kk}u", f * j) } else { format!("{kk}u * {stride_cols}u + wn + {}u", f * j) }
                };
                let strides = (format!("{stride}u"), format!("{b_stride}u"));
                coop_step(line, f, trans_b, &FragmentSource { arrays: ("slab_a", "slab_b"), a_at: &a_at, b_at: &b_at, strides: (&strides.0, &strides.1) });
            }
            line("}".into());
            line("let rm = m0 + wm; let rn = n0 + wn;".into());
            coop_stores(line, f, ("rm", "rn"));
        })
    }))
}

/// The k loop of `wide_block` for one layout of A and B. A not
/// transposed: each row's next four k (`a{r}`). A transposed (stored
/// [K, M], M whole groups of four): four consecutive rows at each of the
/// next four k (`at{j}_{q}` for k + j and rows 4q .. 4q + 3), whose
/// components make up the same `a{r}` for free (lavapipe keeps a vector's
/// components in separate registers). B transposed (stored [N, K]): column
/// c of op(B) is row c of B, four k at a time (`b{c}`); else four
/// consecutive columns of each of four rows (`b{j}_{g}`).
fn wide_k_loop(trans_a: bool, trans_b: bool, line: &mut dyn FnMut(String)) {
    let groups = WIDE_COLS / 4;
    if trans_a {
        for q in 0..WIDE_ROWS / 4 {
            line(format!("let ca{q} = p.a_off + min(m0 + {}u, p.m - 4u);", 4 * q));
        }
    } else {
        for r in 0..WIDE_ROWS {
            line(format!("let ra{r} = (p.a_off + min(m0 + {r}u, last_row) * p.lda) / 4u;"));
        }
    }
    if trans_b {
        for c in 0..WIDE_COLS {
            line(format!("let rb{c} = p.b_off + wide_col(n0, {c}u, p.n - 1u) * p.ldb;"));
        }
    } else {
        for g in 0..groups {
            line(format!("let cb{g} = p.b_off + wide_col(n0, {}u, p.n - 4u);", 4 * g));
        }
    }
    line("for (var k = 0u; k < p.k; k += 4u) {".into());
    if trans_b {
        for c in 0..WIDE_COLS {
            line(format!("let b{c} = b_quad(rb{c} + k);"));
        }
    } else {
        for j in 0..4 {
            line(format!("let row{j} = (k + {j}u) * p.ldb;"));
            for g in 0..groups {
                line(format!("let b{j}_{g} = b_quad(cb{g} + row{j});"));
            }
        }
    }
    if trans_a {
        for j in 0..4 {
            for q in 0..WIDE_ROWS / 4 {
                line(format!("let at{j}_{q} = a_quads[(ca{q} + (k + {j}u) * p.lda) / 4u];"));
            }
        }
    }
    for r in 0..WIDE_ROWS {
        line(if trans_a {
            let (q, lane) = (r / 4, ["x", "y", "z", "w"][r % 4]);
            format!("let a{r} = vec4<f32>(at0_{q}.{lane}, at1_{q}.{lane}, at2_{q}.{lane}, at3_{q}.{lane});")
        } else {
            format!("let a{r} = a_quads[ra{r} + k / 4u];")
        });
        for g in 0..groups {
            line(if trans_b {
                let dots: Vec<String> = (0..4).map(|j| format!("dot(a{r}, b{})", 4 * g + j)).collect();
                format!("c{r}_{g} += vec4<f32>({});", dots.join(", "))
            } else {
                format!("c{r}_{g} = fma(vec4<f32>(a{r}.x), b0_{g}, fma(vec4<f32>(a{r}.y), b1_{g}, fma(vec4<f32>(a{r}.z), b2_{g}, fma(vec4<f32>(a{r}.w), b3_{g}, c{r}_{g}))));")
            });
        }
    }
    line("}".into());
}

fn groups(m: usize, n: usize, batch: usize) -> [u32; 3] {
    [n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, batch as u32]
}

/// A matrix inside a single-buffer tensor: `rows` × `cols` elements from
/// element `offset`, consecutive rows `ld` elements apart.
#[derive(Debug, Clone, Copy)]
pub struct MatrixView<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl MatrixView<'_> {
    fn check(&self, what: &str) -> Result<(&wgpu::Buffer, usize)> {
        let (buf, base) = self.tensor.single("matmul_views")?;
        let end = if self.rows == 0 { 0 } else { self.offset + (self.rows - 1) * self.ld + self.cols };
        if self.cols > self.ld || end > self.tensor.numel() {
            return Err(GpuError::shape("matmul_views", format!("{what} view {}x{} at {} (ld {}) exceeds its tensor", self.rows, self.cols, self.offset, self.ld)));
        }
        Ok((buf, base + self.offset))
    }
}

impl GpuContext {
    /// C = alpha·op(A)·op(B) + beta·C on sub-matrices of single-buffer
    /// tensors (blocked factorisations work on such views). C's buffer must
    /// not hold A or B: WebGPU forbids a buffer bound writably twice.
    pub fn matmul_views(&self, a: MatrixView<'_>, b: MatrixView<'_>, c: MatrixView<'_>, spec: MatmulSpec) -> Result<()> {
        self.matmul_views_in(a, b, c, spec, None)
    }

    /// As `matmul_views` for a C that is the block at (`row`, `col`) of a
    /// matrix whose lower triangle alone matters: tiles wholly above its
    /// diagonal are skipped (about half the work of a square trailing
    /// update).
    pub(crate) fn matmul_views_lower(&self, a: MatrixView<'_>, b: MatrixView<'_>, c: MatrixView<'_>, spec: MatmulSpec, row: usize, col: usize) -> Result<()> {
        self.matmul_views_in(a, b, c, spec, Some((row, col)))
    }

    fn matmul_views_in(&self, a: MatrixView<'_>, b: MatrixView<'_>, c: MatrixView<'_>, spec: MatmulSpec, lower: Option<(usize, usize)>) -> Result<()> {
        require_f32("matmul_views", &[c.tensor])?;
        let (m, ka) = if spec.trans_a { (a.cols, a.rows) } else { (a.rows, a.cols) };
        let (kb, n) = if spec.trans_b { (b.cols, b.rows) } else { (b.rows, b.cols) };
        if ka != kb || c.rows != m || c.cols != n {
            return Err(GpuError::shape("matmul_views", format!("{m}x{ka} · {kb}x{n} into {}x{}", c.rows, c.cols)));
        }
        let (a_buf, a_off) = a.check("A")?;
        let (b_buf, b_off) = b.check("B")?;
        let (c_buf, c_off) = c.check("C")?;
        let defines = defines(&spec, a.tensor.dtype(), b.tensor.dtype());
        let params = Params {
            m: u32_of(m, "matmul_views")?,
            n: u32_of(n, "matmul_views")?,
            k: u32_of(ka, "matmul_views")?,
            batch: 1,
            lda: u32_of(a.ld, "matmul_views")?,
            ldb: u32_of(b.ld, "matmul_views")?,
            ldc: u32_of(c.ld, "matmul_views")?,
            a_off: u32_of(a_off, "matmul_views")?,
            b_off: u32_of(b_off, "matmul_views")?,
            c_off: u32_of(c_off, "matmul_views")?,
            lower_only: lower.is_some() as u32,
            row_base: u32_of(lower.map_or(0, |l| l.0), "matmul_views")?,
            col_base: u32_of(lower.map_or(0, |l| l.1), "matmul_views")?,
            alpha: spec.alpha,
            beta: spec.beta,
            ..Default::default()
        };
        let operands = [
            Operand { buffer: a_buf, offset: a_off, ld: a.ld, dtype: a.tensor.dtype() },
            Operand { buffer: b_buf, offset: b_off, ld: b.ld, dtype: b.tensor.dtype() },
            Operand { buffer: c_buf, offset: c_off, ld: c.ld, dtype: DType::F32 },
        ];
        let (entry, grid) = self.chosen_product(&spec, operands, (m, ka, n), false, false).unwrap_or(("matmul", groups(m, n, 1)));
        let [a_binding, b_binding, c_binding] = operand_bindings(entry);
        self.dispatch_work(
            Kernel { family: ShaderFamily::Matmul, entry, defines: &defines },
            bytemuck::bytes_of(&params),
            &[(a_binding, a_buf), (b_binding, b_buf), (c_binding, c_buf)],
            grid,
            Some(Work::matmul(m, n, ka, 1)),
        )
    }

    /// op(A)·op(B) into a new f32 tensor. 2-D operands give [M, N]; 3-D
    /// operands [batch, ., .] give [batch, M, N]; a 3-D A with a 2-D B
    /// applies B to every batch item.
    pub fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        self.product(a, b, MatmulSpec::new(trans_a, trans_b), Epilogue::default())
    }

    /// C = alpha * op(A)·op(B) + beta * C, with C already allocated.
    pub fn matmul_into(&self, a: &Tensor, b: &Tensor, c: &Tensor, spec: MatmulSpec) -> Result<()> {
        self.matmul_epilogue_into(a, b, c, spec, Epilogue::default(), None)
    }

    /// x·op(W) + bias + residual into a new tensor, for a 2-D `x` (or 3-D,
    /// folded into rows), with both sums in the product's epilogue.
    pub fn linear(&self, x: &Tensor, w: &Tensor, trans_b: bool, epilogue: Epilogue<'_>) -> Result<Tensor> {
        self.product(x, w, MatmulSpec::new(false, trans_b), epilogue)
    }

    /// An MLP's input projection and its activation in one dispatch:
    /// (x·op(W) + bias, act of it), or for `gated`, where W holds the gate
    /// rows then the up rows of N/2 features, (gate | up, act(gate)·up).
    /// When W spans several bindings (or K is 0) the activation runs as a
    /// dispatch of its own.
    pub fn linear_activated(&self, x: &Tensor, w: &Tensor, trans_b: bool, bias: Option<&Tensor>, act: Activation, gated: bool) -> Result<(Tensor, Tensor)> {
        let spec = MatmulSpec::new(false, trans_b);
        let (m, k, n) = product_dims(x, w, &spec)?;
        if gated && n % 2 != 0 {
            return Err(GpuError::shape("linear_activated", format!("gate | up weights with an odd number ({n}) of outputs")));
        }
        let epilogue = Epilogue { bias, residual: None };
        if k == 0 || w.single("linear_activated").is_err() {
            let pre = self.linear(x, w, trans_b, epilogue)?;
            let key = if gated { self.gated_activation(&pre, act)? } else { self.activation(&pre, act)? };
            return Ok((pre, key));
        }
        let rows_shape = |width| match x.shape().len() {
            3 => vec![x.shape()[0], m, width],
            _ => vec![m, width],
        };
        let pre = self.empty(&rows_shape(n), DType::F32)?;
        let keys = self.empty(&rows_shape(if gated { n / 2 } else { n }), DType::F32)?;
        self.matmul_epilogue_into(x, w, &pre, spec, epilogue, Some(Activated { keys: &keys, act, gated }))?;
        Ok((pre, keys))
    }

    /// op(A)·op(B) plus the epilogue's terms into a new f32 tensor.
    fn product(&self, a: &Tensor, b: &Tensor, spec: MatmulSpec, epilogue: Epilogue<'_>) -> Result<Tensor> {
        let (m, k, n) = product_dims(a, b, &spec)?;
        let shape = match a.shape().len() {
            3 => vec![a.shape()[0], m, n],
            _ => vec![m, n],
        };
        if k > 0 {
            let c = self.empty(&shape, DType::F32)?;
            self.matmul_epilogue_into(a, b, &c, spec, epilogue, None)?;
            return Ok(c);
        }
        // An empty inner dimension launches nothing: C is zero (the call
        // still checks the shapes), and the epilogue's terms are added here.
        let mut c = self.zeros(&shape, DType::F32)?;
        self.matmul_epilogue_into(a, b, &c, spec, Epilogue::default(), None)?;
        for term in [epilogue.residual, epilogue.bias].into_iter().flatten() {
            c = self.binary(crate::BinaryOp::Add, &c, term)?;
        }
        Ok(c)
    }

    /// `matmul_into` plus an epilogue (2-D products, or 3-D A with 2-D B;
    /// K > 0, see `product`), and the activations when `activated`.
    fn matmul_epilogue_into(&self, a: &Tensor, b: &Tensor, c: &Tensor, spec: MatmulSpec, epilogue: Epilogue<'_>, activated: Option<Activated<'_>>) -> Result<()> {
        require_f32("matmul (output)", &[c])?;
        let (m, k, n) = product_dims(a, b, &spec)?;
        if let Some(bias) = epilogue.bias {
            require_f32("matmul (bias)", &[bias])?;
            if bias.numel() != n {
                return Err(GpuError::shape("matmul", format!("bias of {} values for {n} columns", bias.numel())));
            }
        }
        if let Some(r) = epilogue.residual {
            require_f32("matmul (residual)", &[r])?;
            if r.shape() != c.shape() {
                return Err(GpuError::shape("matmul", format!("residual of shape {:?} for an output of shape {:?}", r.shape(), c.shape())));
            }
        }
        let has_epilogue = epilogue.bias.is_some() || epilogue.residual.is_some() || activated.is_some();
        match (a.shape().len(), b.shape().len()) {
            (2, 2) => {
                expect_shape(c, &[m, n])?;
                self.matmul_2d(a, b, c, spec, (m, k, n), epilogue, activated)
            }
            (3, 2) if !spec.trans_a => {
                // A shared weight: fold the batch into the rows of A and C.
                let batch = a.shape()[0];
                expect_shape(c, &[batch, m, n])?;
                let a2 = a.reshape(&[batch * m, k])?;
                let c2 = c.reshape(&[batch * m, n])?;
                let r2 = epilogue.residual.map(|r| r.reshape(&[batch * m, n])).transpose()?;
                let keys2 = activated.map(|act| act.keys.reshape(&[batch * m, act.keys.numel() / (batch * m)])).transpose()?;
                let activated2 = activated.zip(keys2.as_ref()).map(|(act, keys)| Activated { keys, ..act });
                self.matmul_2d(&a2, b, &c2, spec, (batch * m, k, n), Epilogue { residual: r2.as_ref(), ..epilogue }, activated2)
            }
            _ if has_epilogue => Err(GpuError::shape("matmul", "an epilogue needs a 2-D B")),
            (3, 3) => {
                let batch = a.shape()[0];
                if b.shape()[0] != batch {
                    return Err(GpuError::shape("matmul", format!("batch {} vs {}", batch, b.shape()[0])));
                }
                expect_shape(c, &[batch, m, n])?;
                self.matmul_batched(a, b, c, spec, m, k, n)
            }
            _ => Err(GpuError::shape("matmul", format!("unsupported operand ranks {:?} x {:?}", a.shape(), b.shape()))),
        }
    }

    /// Cuts M at chunk boundaries of C (and of A when A's rows are M, and of
    /// the residual), K at those of A (when transposed) and B (when not), N
    /// at those of B (when transposed), and accumulates the K pieces into C;
    /// the first K piece carries the epilogue.
    #[allow(clippy::too_many_arguments)]
    fn matmul_2d(&self, a: &Tensor, b: &Tensor, c: &Tensor, spec: MatmulSpec, (m, k, n): (usize, usize, usize), epilogue: Epilogue<'_>, activated: Option<Activated<'_>>) -> Result<()> {
        let mut row_cuts = vec![c];
        if !spec.trans_a {
            row_cuts.push(a);
        }
        row_cuts.extend(epilogue.residual);
        row_cuts.extend(activated.map(|act| act.keys));
        let m_spans = chunk_spans(m, &row_cuts);
        let bias = epilogue.bias.map(|t| t.single("matmul (bias)")).transpose()?;
        let k_spans = match (spec.trans_a, spec.trans_b) {
            (true, false) => chunk_spans(k, &[a, b]),
            (true, true) => chunk_spans(k, &[a]),
            (false, false) => chunk_spans(k, &[b]),
            (false, true) => vec![(0, k)],
        };
        let n_spans = if spec.trans_b { chunk_spans(n, &[b]) } else { vec![(0, n)] };
        if activated.is_some() && (k_spans.len() > 1 || n_spans.len() > 1) {
            return Err(GpuError::shape("matmul", "an activated product needs its weight in one binding"));
        }
        let gated = activated.is_some_and(|act| act.gated);
        // Columns the kernels index: a gated product's features.
        let n_cols = if gated { n / 2 } else { n };
        // K pieces after the first add to C.
        let plain = defines(&MatmulSpec { beta: 1.0, ..spec }, a.dtype(), b.dtype());
        let with_epilogue = epilogue_defines(&spec, a.dtype(), b.dtype(), epilogue.residual.is_some(), bias.is_some(), activated.map(|act| (act.act, act.gated)));
        // Only f16 · f16 products may take tensor cores.
        let coop_defines: Vec<_> = match self.coop_sizes().filter(|_| a.dtype() == DType::F16 && b.dtype() == DType::F16) {
            Some(sizes) => std::iter::once(("TRANS_B", flag(spec.trans_b))).chain(sizes.defines()).collect(),
            None => Vec::new(),
        };
        for &(m0, mlen) in &m_spans {
            let residual = epilogue.residual.map(|r| r.locate(m0));
            let keys = activated.map(|act| act.keys.locate(m0));
            for &(n0, nlen) in &n_spans {
                let nlen = if gated { n_cols } else { nlen };
                let (c_buf, c_off) = c.locate(m0);
                for (ki, &(k0, klen)) in k_spans.iter().enumerate() {
                    let kernel = Kernel { family: ShaderFamily::Matmul, entry: "matmul", defines: if ki == 0 { &with_epilogue } else { &plain } };
                    let few_rows = Kernel { entry: "matmul_rows", ..kernel };
                    let (a_buf, a_off) = if spec.trans_a { shift(a.locate(k0), m0) } else { shift(a.locate(m0), k0) };
                    let (b_buf, b_off) = if spec.trans_b { shift(b.locate(n0), k0) } else { shift(b.locate(k0), n0) };
                    let params = Params {
                        m: u32_of(mlen, "matmul")?,
                        n: u32_of(nlen, "matmul")?,
                        k: u32_of(klen, "matmul")?,
                        batch: 1,
                        lda: u32_of(a.row_len(), "matmul")?,
                        ldb: u32_of(b.row_len(), "matmul")?,
                        ldc: u32_of(n, "matmul")?,
                        a_off: u32_of(a_off, "matmul")?,
                        b_off: u32_of(b_off, "matmul")?,
                        c_off: u32_of(c_off + n0, "matmul")?,
                        alpha: spec.alpha,
                        beta: if ki == 0 { spec.beta } else { 1.0 },
                        add_off: u32_of(residual.as_ref().map_or(0, |r| r.1 + n0), "matmul")?,
                        add_ld: u32_of(n, "matmul")?,
                        bias_off: u32_of(bias.map_or(0, |b| b.1 + n0), "matmul")?,
                        key_off: u32_of(keys.as_ref().map_or(0, |k| k.1), "matmul")?,
                        key_ld: u32_of(n_cols, "matmul")?,
                        ..Default::default()
                    };
                    // A gated tile covers 32 features (their 64 gate and up columns).
                    let tile_cols = if gated { TILE / 2 } else { TILE };
                    let operands = [
                        Operand { buffer: &a_buf, offset: a_off, ld: a.row_len(), dtype: a.dtype() },
                        Operand { buffer: &b_buf, offset: b_off, ld: b.row_len(), dtype: b.dtype() },
                        Operand { buffer: &c_buf, offset: c_off + n0, ld: n, dtype: DType::F32 },
                    ];
                    let plain_product = ki == 0 && k_spans.len() == 1 && spec.alpha == 1.0 && spec.beta == 0.0 && epilogue.residual.is_none() && bias.is_none() && activated.is_none();
                    let coop = plain_product.then(|| self.coop_grid(&spec, operands, (mlen, klen, nlen))).flatten();
                    let chosen = match coop {
                        Some((entry, grid)) => Some((Kernel { family: ShaderFamily::MatmulCoop, entry, defines: &coop_defines }, grid)),
                        None => self.chosen_product(&spec, operands, (mlen, klen, nlen), gated, true).map(|(entry, grid)| (Kernel { entry, ..kernel }, grid)),
                    };
                    let (kernel, grid) = match chosen {
                        Some(chosen) => chosen,
                        None if !spec.trans_a && mlen <= FEW_ROWS => (few_rows, [nlen.div_ceil(ROWS_GROUP) as u32, 1, 1]),
                        None => (kernel, [nlen.div_ceil(tile_cols) as u32, mlen.div_ceil(TILE) as u32, 1]),
                    };
                    let [a_binding, b_binding, c_binding] = operand_bindings(kernel.entry);
                    let mut buffers: Vec<(u32, &wgpu::Buffer)> = vec![(a_binding, &a_buf), (b_binding, &b_buf), (c_binding, &c_buf)];
                    if ki == 0 {
                        buffers.extend(residual.as_ref().map(|r| (5, &**r.0)));
                        buffers.extend(bias.map(|b| (6, b.0)));
                        buffers.extend(keys.as_ref().map(|k| (7, &**k.0)));
                    }
                    let work = Work::matmul(mlen, if gated { n } else { nlen }, klen, 1);
                    let splits = if kernel.entry == "matmul_big" { self.split_count(grid[0] as usize * grid[1] as usize, klen) } else { 1 };
                    if splits > 1 {
                        let operands = SplitOperands { a: (&a_buf, a_off), b: (&b_buf, b_off), dtypes: (a.dtype(), b.dtype()) };
                        self.split_product(&spec, operands, (mlen, klen, if gated { 2 * n_cols } else { nlen }), splits, &params, kernel, &buffers, work)?;
                        continue;
                    }
                    self.dispatch_work(kernel, bytemuck::bytes_of(&params), &buffers, grid, Some(work))?;
                }
            }
        }
        Ok(())
    }

    /// One dispatch per batch range that lies in one chunk of A, B and C.
    #[allow(clippy::too_many_arguments)]
    fn matmul_batched(&self, a: &Tensor, b: &Tensor, c: &Tensor, spec: MatmulSpec, m: usize, k: usize, n: usize) -> Result<()> {
        let defines = defines(&spec, a.dtype(), b.dtype());
        let kernel = Kernel { family: ShaderFamily::Matmul, entry: "matmul", defines: &defines };
        for (z0, zlen) in chunk_spans(a.rows(), &[a, b, c]) {
            for (sub0, sublen) in (0..zlen).step_by(65_535).map(|s| (s, (zlen - s).min(65_535))) {
                let z = z0 + sub0;
                let (a_buf, a_off) = a.locate(z);
                let (b_buf, b_off) = b.locate(z);
                let (c_buf, c_off) = c.locate(z);
                let params = Params {
                    m: u32_of(m, "matmul")?,
                    n: u32_of(n, "matmul")?,
                    k: u32_of(k, "matmul")?,
                    batch: u32_of(sublen, "matmul")?,
                    lda: u32_of(a.shape()[2], "matmul")?,
                    ldb: u32_of(b.shape()[2], "matmul")?,
                    ldc: u32_of(n, "matmul")?,
                    a_off: u32_of(a_off, "matmul")?,
                    b_off: u32_of(b_off, "matmul")?,
                    c_off: u32_of(c_off, "matmul")?,
                    a_bstride: u32_of(a.row_len(), "matmul")?,
                    b_bstride: u32_of(b.row_len(), "matmul")?,
                    c_bstride: u32_of(c.row_len(), "matmul")?,
                    alpha: spec.alpha,
                    beta: spec.beta,
                    ..Default::default()
                };
                self.dispatch_work(
                    kernel,
                    bytemuck::bytes_of(&params),
                    &[(1, &a_buf), (2, &b_buf), (3, &c_buf)],
                    groups(m, n, sublen),
                    Some(Work::matmul(m, n, k, sublen)),
                )?;
            }
        }
        Ok(())
    }

    /// C += alpha · Kᵀ K for keys K [n, d] (rows = tokens): the upper
    /// triangle (and diagonal tiles) of the uncentered second moment, with
    /// Kahan compensation kept in `comp` so sums over millions of tokens stay
    /// accurate in f32. Call [`GpuContext::mirror_upper`] before using C whole.
    /// Where `matmul_wide` fits (lavapipe), it takes whole groups of four
    /// tokens, one dispatch per slab of [`WIDE_SYRK_SLAB`], each Kahan-added
    /// to C; the `syrk` tiles take the rest (their slabs are 64 tokens).
    pub fn syrk_accumulate(&self, c: &Tensor, comp: &Tensor, keys: &Tensor, alpha: f32) -> Result<()> {
        require_f32("syrk", &[c, comp, keys])?;
        let (_, d) = keys.dims2("syrk")?;
        expect_shape(c, &[d, d])?;
        expect_shape(comp, &[d, d])?;
        let spec = MatmulSpec { trans_a: true, trans_b: false, alpha, beta: 1.0 };
        let defines = defines(&spec, DType::F32, DType::F32);
        let wide_defines: Vec<_> = defines
            .iter()
            .map(|(k, v)| match *k {
                "WIDE_SYRK" => (*k, flag(true)),
                "WIDE_SYRK_PUT" => (*k, WIDE_SYRK_PUT.to_string()),
                _ => (*k, v.clone()),
            })
            .collect();
        for (r0, rlen) in chunk_spans(d, &[c, comp]) {
            let (c_buf, c_off) = c.locate(r0);
            let (comp_buf, comp_off) = comp.locate(r0);
            if comp_off != c_off {
                return Err(GpuError::shape("syrk", "the compensation tensor must be laid out like C (allocate both with zeros)"));
            }
            for (t0, tlen) in chunk_spans(keys.rows(), &[keys]) {
                let (k_buf, k_off) = keys.locate(t0);
                // Tokens from `first` on, `count` of them, by `entry`.
                let dispatch = |entry: &'static str, first: usize, count: usize, grid: [u32; 3]| -> Result<()> {
                    let params = Params {
                        m: u32_of(rlen, "syrk")?,
                        n: u32_of(d, "syrk")?,
                        k: u32_of(count, "syrk")?,
                        batch: 1,
                        lda: u32_of(d, "syrk")?,
                        ldb: u32_of(d, "syrk")?,
                        ldc: u32_of(d, "syrk")?,
                        row_base: u32_of(r0, "syrk")?,
                        a_off: u32_of(k_off + first * d + r0, "syrk")?,
                        b_off: u32_of(k_off + first * d, "syrk")?,
                        c_off: u32_of(c_off, "syrk")?,
                        alpha,
                        beta: 1.0,
                        ..Default::default()
                    };
                    // Only the upper triangle's elements of these rows are needed.
                    let upper = (r0..r0 + rlen).map(|r| (d - r) as u64).sum::<u64>();
                    let work = Work { flops: 2 * upper * count as u64, ..Work::matmul(rlen, d, count, 1) };
                    let [a_binding, b_binding, c_binding] = operand_bindings(entry);
                    let (defines, comp_binding) = if entry == "matmul_wide" { (&wide_defines, 11) } else { (&defines, 4) };
                    let buffers: [(u32, &wgpu::Buffer); 4] = [(a_binding, &k_buf), (b_binding, &k_buf), (c_binding, &c_buf), (comp_binding, &comp_buf)];
                    self.dispatch_work(Kernel { family: ShaderFamily::Matmul, entry, defines }, bytemuck::bytes_of(&params), &buffers, grid, Some(work))
                };
                // Slabs start whole rows of K apart (d a multiple of 4 where
                // it fits) and the grid depends on M and N alone, so the fit
                // and grid of all the whole groups serve every slab.
                let whole = tlen / 4 * 4;
                let keys = |offset| Operand { buffer: &k_buf, offset, ld: d, dtype: DType::F32 };
                let operands = [keys(k_off + r0), keys(k_off), Operand { buffer: &c_buf, offset: c_off, ld: d, dtype: DType::F32 }];
                let mut done = 0;
                if let Some(grid) = self.wide_grid(&spec, operands, (rlen, whole, d), false) {
                    for first in (0..whole).step_by(WIDE_SYRK_SLAB) {
                        dispatch("matmul_wide", first, WIDE_SYRK_SLAB.min(whole - first), grid)?;
                    }
                    done = whole;
                }
                if done < tlen {
                    dispatch("syrk", done, tlen - done, groups(rlen, d, 1))?;
                }
            }
        }
        Ok(())
    }

    /// Copies the upper triangle of the square matrix `c` onto its lower one.
    pub fn mirror_upper(&self, c: &Tensor) -> Result<()> {
        require_f32("mirror_upper", &[c])?;
        let (d, d2) = c.dims2("mirror_upper")?;
        if d != d2 {
            return Err(GpuError::shape("mirror_upper", format!("matrix is {d}x{d2}, not square")));
        }
        let defines = defines(&MatmulSpec::default(), DType::F32, DType::F32);
        let spans = chunk_spans(d, &[c]);
        for &(r0, rlen) in &spans {
            let (dst_buf, dst_off) = c.locate(r0);
            for &(s0, slen) in spans.iter().filter(|&&(s0, _)| s0 < r0 + rlen) {
                let (src_buf, src_off) = c.locate(s0);
                let params = Params {
                    m: u32_of(rlen, "mirror_upper")?,
                    n: u32_of(slen, "mirror_upper")?,
                    k: u32_of(s0, "mirror_upper")?,
                    ldc: u32_of(d, "mirror_upper")?,
                    row_base: u32_of(r0, "mirror_upper")?,
                    a_off: u32_of(src_off, "mirror_upper")?,
                    c_off: u32_of(dst_off, "mirror_upper")?,
                    ..Default::default()
                };
                let (entry, buffers): (_, &[(u32, &wgpu::Buffer)]) =
                    if std::sync::Arc::ptr_eq(&src_buf, &dst_buf) { ("mirror_within", &[(3, &dst_buf)]) } else { ("mirror", &[(3, &dst_buf), (5, &src_buf)]) };
                self.dispatch(
                    Kernel { family: ShaderFamily::Matmul, entry, defines: &defines },
                    bytemuck::bytes_of(&params),
                    buffers,
                    [slen.div_ceil(16) as u32, rlen.div_ceil(16) as u32, 1],
                )?;
            }
        }
        Ok(())
    }
}

impl GpuContext {
    /// The grid of `matmul_direct` for an M × N product (N: features when
    /// `gated`), or None where that kernel does not take it: more rows than
    /// `direct_product_rows`, A transposed, or an f16 B it cannot read a
    /// word (two values) at a time, which needs an even offset and row
    /// stride and, B not transposed, whole groups of four columns.
    fn direct_grid(&self, spec: &MatmulSpec, b_dtype: DType, (b_off, ldb): (usize, usize), m: usize, n: usize, gated: bool) -> Option<[u32; 3]> {
        let words_fit = b_off.is_multiple_of(2) && ldb.is_multiple_of(2) && (spec.trans_b || (!gated && n.is_multiple_of(4)));
        if m > self.direct_product_rows() || spec.trans_a || (b_dtype == DType::F16 && !words_fit) {
            return None;
        }
        // Four columns (gated: two features) by four rows per invocation.
        let per_invocation = if gated { 2 } else { 4 };
        Some([n.div_ceil(per_invocation * DIRECT_GROUP) as u32, m.div_ceil(4) as u32, 1])
    }
}

/// A product operand as a kernel reads it: its buffer, the element offset
/// of its first element there, its row stride and storage type.
#[derive(Clone, Copy)]
struct Operand<'a> {
    buffer: &'a wgpu::Buffer,
    offset: usize,
    ld: usize,
    dtype: DType,
}

impl GpuContext {
    /// The grid of `matmul_wide` for an M × K × N product of operands
    /// [A, B, C] (N: features when `gated`), or None where that kernel does
    /// not take it: at most `wide_product_rows` rows, A f16, or operands it
    /// cannot access four values at a time (offsets, row strides, K and N,
    /// and M where A is transposed, whole groups of four; buffers that end
    /// on a whole group). Blocks (32 columns, or 16 features' gate and up) are
    /// numbered along the rows of C, the workgroups over x and y.
    fn wide_grid(&self, spec: &MatmulSpec, operands: [Operand<'_>; 3], (m, k, n): (usize, usize, usize), gated: bool) -> Option<[u32; 3]> {
        let in_fours = operands.iter().all(|o| o.offset.is_multiple_of(4) && o.ld.is_multiple_of(4) && o.buffer.size().is_multiple_of(4 * o.dtype.size() as u64));
        if m <= self.wide_product_rows() || (spec.trans_a && !m.is_multiple_of(4)) || operands[0].dtype != DType::F32 || k == 0 || n == 0 || !in_fours || !k.is_multiple_of(4) || !n.is_multiple_of(4) {
            return None;
        }
        let block_cols = if gated { WIDE_COLS / 2 } else { WIDE_COLS };
        Some(grid_1d((m.div_ceil(WIDE_ROWS) * n.div_ceil(block_cols)).div_ceil(WIDE_GROUP)))
    }
}

/// A and B of a split product: their buffers, element offsets and dtypes.
struct SplitOperands<'a> {
    a: (&'a wgpu::Buffer, usize),
    b: (&'a wgpu::Buffer, usize),
    dtypes: (DType, DType),
}

impl GpuContext {
    /// How many slabs of K a `matmul_big` product with `groups` workgroups
    /// is split into: enough for `SplitK::target_groups` workgroups, each
    /// slab at least `SplitK::min_chunk` long; 1 (no split) where the grid
    /// is large enough already, and on CPU adapters.
    fn split_count(&self, groups: usize, k: usize) -> usize {
        let SplitK { target_groups, min_chunk } = self.split_k();
        if groups == 0 || groups >= target_groups {
            return 1;
        }
        target_groups.div_ceil(groups).min(k / min_chunk.max(1)).max(1)
    }

    /// A `matmul_big` product over few workgroups and a long K, split:
    /// one dispatch writes `splits` slabs of raw partial sums A·op(B)
    /// (a gated product's gate and up columns side by side), a second adds
    /// them and applies the product's epilogue (`matmul_split_sum`, with
    /// `kernel`'s defines). `params` and `buffers` are the unsplit
    /// dispatch's; `(m, k, raw_cols)` the product's rows, depth and raw
    /// columns.
    #[allow(clippy::too_many_arguments)]
    fn split_product(&self, spec: &MatmulSpec, operands: SplitOperands<'_>, (m, k, raw_cols): (usize, usize, usize), splits: usize, params: &Params, kernel: Kernel<'_>, buffers: &[(u32, &wgpu::Buffer)], work: Work) -> Result<()> {
        let chunk = k.div_ceil(splits).next_multiple_of(BIG_K);
        let splits = k.div_ceil(chunk);
        let partials = self.empty(&[splits * m, raw_cols], DType::F32)?;
        let (part_buf, part_off) = partials.single("matmul (split-K partial sums)")?;
        let part_stride = m * raw_cols;
        let raw = Params {
            n: u32_of(raw_cols, "matmul")?,
            ldc: u32_of(raw_cols, "matmul")?,
            c_off: u32_of(part_off, "matmul")?,
            alpha: 1.0,
            beta: 0.0,
            k_split: u32_of(chunk, "matmul")?,
            part_stride: u32_of(part_stride, "matmul")?,
            ..*params
        };
        let raw_defines = defines(&MatmulSpec { alpha: 1.0, beta: 0.0, ..*spec }, operands.dtypes.0, operands.dtypes.1);
        let grid = [raw_cols.div_ceil(BIG_TILE) as u32, m.div_ceil(BIG_TILE) as u32, splits as u32];
        let partial_buffers = [(1, operands.a.0), (2, operands.b.0), (3, part_buf)];
        self.dispatch_work(Kernel { family: ShaderFamily::Matmul, entry: "matmul_big", defines: &raw_defines }, bytemuck::bytes_of(&raw), &partial_buffers, grid, Some(work))?;
        let sum = Params {
            splits: u32_of(splits, "matmul")?,
            part_stride: u32_of(part_stride, "matmul")?,
            part_off: u32_of(part_off, "matmul")?,
            part_ld: u32_of(raw_cols, "matmul")?,
            ..*params
        };
        let mut sum_buffers: Vec<(u32, &wgpu::Buffer)> = buffers.iter().copied().filter(|&(b, _)| b != 1 && b != 2).collect();
        sum_buffers.push((12, part_buf));
        let grid = [(sum.n as usize).div_ceil(SPLIT_SUM_GROUP) as u32, m as u32, 1];
        self.dispatch(Kernel { entry: "matmul_split_sum", ..kernel }, bytemuck::bytes_of(&sum), &sum_buffers, grid)
    }

    /// The tensor-core kernels' sizes on this device, where they are on.
    fn coop_sizes(&self) -> Option<CoopSizes> {
        self.coop_shape().map(|c| CoopSizes::new(c.fragment as usize, c.subgroup as usize))
    }

    /// The tensor-core kernel and its grid for a plain C = A·op(B) of f16
    /// A (not transposed) and f16 B into f32 C, where the device has them
    /// and every offset and stride is a whole number of fragment rows and
    /// of the staged kernel's 16-byte words (16 halves on NVIDIA, 8 on
    /// lavapipe) and K of fragments: `matmul_coop_staged` where M and N
    /// are whole workgroup tiles and it is on (`CoopShape::staged`, which
    /// the device's limits decide), else `matmul_coop` where they are whole
    /// subgroup tiles; else None.
    fn coop_grid(&self, spec: &MatmulSpec, operands: [Operand<'_>; 3], (m, k, n): (usize, usize, usize)) -> Option<(&'static str, [u32; 3])> {
        let sizes = self.coop_sizes()?;
        let [a, b, c] = operands;
        let unit = sizes.fragment.max(8);
        let aligned = operands.iter().all(|o| o.offset.is_multiple_of(unit) && o.ld.is_multiple_of(unit) && o.buffer.size().is_multiple_of(16));
        let fits = !spec.trans_a && a.dtype == DType::F16 && b.dtype == DType::F16 && c.dtype == DType::F32;
        if !(fits && aligned && m > 0 && n > 0 && k > 0 && k.is_multiple_of(sizes.fragment)) {
            return None;
        }
        let staged = self.coop_shape().is_some_and(|c| c.staged);
        let (wide, narrow) = (sizes.workgroup_tile(), sizes.subgroup_tile());
        if staged && m.is_multiple_of(wide) && n.is_multiple_of(wide) {
            return Some(("matmul_coop_staged", [(n / wide) as u32, (m / wide) as u32, 1]));
        }
        (m.is_multiple_of(narrow) && n.is_multiple_of(narrow)).then_some(("matmul_coop", [(n / narrow) as u32, (m / narrow) as u32, 1]))
    }

    /// The product kernel for an M × K × N product of `operands` and its
    /// grid, where one other than the 64×64 tiles takes it: on CPU adapters
    /// `matmul_direct` or `matmul_wide`, on GPUs `matmul_big` when its grid
    /// has at least `big_product_groups` workgroups and the product is not
    /// one for `matmul_rows` (at most FEW_ROWS rows of A not transposed,
    /// unless `splittable` and K is long enough to be split); else None
    /// (the tiles' or `matmul_rows`' turn).
    fn chosen_product(&self, spec: &MatmulSpec, operands: [Operand<'_>; 3], (m, k, n): (usize, usize, usize), gated: bool, splittable: bool) -> Option<(&'static str, [u32; 3])> {
        let b = operands[1];
        self.direct_grid(spec, b.dtype, (b.offset, b.ld), m, n, gated)
            .map(|grid| ("matmul_direct", grid))
            .or_else(|| self.wide_grid(spec, operands, (m, k, n), gated).map(|grid| ("matmul_wide", grid)))
            .or_else(|| {
                let tile_cols = if gated { BIG_TILE / 2 } else { BIG_TILE };
                let grid = [n.div_ceil(tile_cols) as u32, m.div_ceil(BIG_TILE) as u32, 1];
                let groups = grid[0] as usize * grid[1] as usize;
                let split = splittable && k >= FEW_ROWS_SPLIT_K && self.split_count(groups, k) > 1;
                let few_rows = !spec.trans_a && m <= FEW_ROWS && !split;
                (k > 0 && !few_rows && groups >= self.big_product_groups()).then_some(("matmul_big", grid))
            })
    }
}

/// The bindings of A, B and C for product kernel `entry`: `matmul_wide`
/// reads and writes them through its four-value views.
fn operand_bindings(entry: &str) -> [u32; 3] {
    match entry {
        "matmul_wide" => [8, 9, 10],
        // A and B as 16-byte words.
        "matmul_coop_staged" => [8, 9, 3],
        _ => [1, 2, 3],
    }
}

fn shift((buf, off): (std::sync::Arc<PooledBuffer>, usize), by: usize) -> (std::sync::Arc<PooledBuffer>, usize) {
    (buf, off + by)
}

fn expect_shape(t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(GpuError::shape("matmul", format!("output has shape {:?}, expected {shape:?}", t.shape())));
    }
    Ok(())
}

/// (M, K, N) of op(A)·op(B), checking that the inner dimensions agree.
fn product_dims(a: &Tensor, b: &Tensor, spec: &MatmulSpec) -> Result<(usize, usize, usize)> {
    let last2 = |t: &Tensor| -> Result<(usize, usize)> {
        match t.shape() {
            [r, c] | [_, r, c] => Ok((*r, *c)),
            s => Err(GpuError::shape("matmul", format!("operand of shape {s:?} is not 2-D or 3-D"))),
        }
    };
    let (ar, ac) = last2(a)?;
    let (br, bc) = last2(b)?;
    let (m, ka) = if spec.trans_a { (ac, ar) } else { (ar, ac) };
    let (kb, n) = if spec.trans_b { (bc, br) } else { (br, bc) };
    if ka != kb {
        return Err(GpuError::shape(
            "matmul",
            format!("inner dimensions differ: {:?}{} x {:?}{}", a.shape(), if spec.trans_a { "ᵀ" } else { "" }, b.shape(), if spec.trans_b { "ᵀ" } else { "" }),
        ));
    }
    Ok((m, ka, n))
}
