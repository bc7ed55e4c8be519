// Tensor-core products (native only, adapters with wgpu's cooperative
// matrices: square f16 fragments of COOP_F, 16 on NVIDIA and 8 on
// lavapipe, accumulated in f32): C = A * op(B) for f16 A (row-major
// [M, K]) and f16 B ([N, K] when TRANS_B, else [K, N]), K a whole number
// of fragments (the host checks every shape, offset and stride).
//
// matmul_coop: one subgroup (COOP_SG invocations) owns a tile of 4x4
// fragments of C and loads its fragments straight from A and B
// (COOP_BLOCK, unrolled by the host). M and N are whole tiles (4 COOP_F).
//
// matmul_coop_staged: four subgroups (2x2) own a tile of 8x8 fragments;
// per slab of 2 COOP_F along k every invocation loads a few 16-byte words
// of A and of B (coalesced, the next slab's while this one is multiplied)
// into workgroup memory, from which each subgroup loads the fragments of
// its quarter, so each word of A and B is read from memory once per
// workgroup instead of once per subgroup (COOP_STAGED_BLOCK). M and N are
// whole tiles (8 COOP_F).
enable f16;
enable wgpu_cooperative_matrix;

{{MATMUL_PARAMS}}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<f16>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
// The staged kernel's view of A and B: 16-byte words of eight halves, as
// matrices of two columns of four so they load as f16 without a
// conversion (a vec4<u32> view needs two per half: unpack to f32 and back).
@group(0) @binding(8) var<storage, read> a_words: array<mat2x4<f16>>;
@group(0) @binding(9) var<storage, read> b_words: array<mat2x4<f16>>;

// The staged kernel's k slabs of A and B (rows padded by 8 halves, 16
// bytes, against bank conflicts).
var<workgroup> slab_a: array<f16, {{COOP_SLAB_A}}>;
var<workgroup> slab_b: array<f16, {{COOP_SLAB_B}}>;

@compute @workgroup_size({{COOP_SG}}, 1, 1)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>) {
    {{COOP_BLOCK}}
}

@compute @workgroup_size(4 * {{COOP_SG}}, 1, 1)
fn matmul_coop_staged(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_id) sg: u32,
) {
    {{COOP_STAGED_BLOCK}}
}
