// Tensor-core products (native only, adapters with wgpu's cooperative
// matrices at 16x16x16, f16 inputs, f32 accumulation): C = A * op(B) for
// f16 A (row-major [M, K]) and f16 B ([N, K] when TRANS_B, else [K, N]),
// with M and N whole multiples of 64 and K of 16 (the host checks). One
// subgroup (32 invocations) owns a 64x64 tile of C as 4x4 accumulators
// (COOP_BLOCK, unrolled by the host): per step of 16 along k it loads four
// tiles of A and four of op(B) and issues 16 multiply-adds.
enable f16;
enable wgpu_cooperative_matrix;

{{MATMUL_PARAMS}}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f16>;
@group(0) @binding(2) var<storage, read> b: array<f16>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(32, 1, 1)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    {{COOP_BLOCK}}
}
