// The parameters of every matrix-product kernel (`matmul`, `matmul_coop`),
// pasted where those families write the MATMUL_PARAMS key; `Params` in
// ops/matmul.rs mirrors it field by field.
struct Params {
    m: u32, n: u32, k: u32, batch: u32,
    lda: u32, ldb: u32, ldc: u32, row_base: u32,
    a_off: u32, b_off: u32, c_off: u32, opaque_zero: u32,
    a_bstride: u32, b_bstride: u32, c_bstride: u32,
    // Non-zero: C is part of a lower triangle whose element (r, c) sits at
    // (row_base + r, col_base + c) of the full matrix; tiles wholly above
    // its diagonal are skipped.
    lower_only: u32,
    alpha: f32, beta: f32, col_base: u32, add_off: u32,
    add_ld: u32, bias_off: u32,
    // Where an activated product writes its activations, and their row stride.
    key_off: u32, key_ld: u32,
    // Split K (`matmul_big` writing partial sums, `matmul_split_sum` adding
    // them): k per split (0: all of K), the partial slabs' count, element
    // stride, row stride and first element.
    k_split: u32, splits: u32, part_stride: u32, part_ld: u32, part_off: u32,
}
