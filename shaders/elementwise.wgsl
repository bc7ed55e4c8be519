// Elementwise ops over flat element ranges: binary ops with broadcast,
// axpby, affine scale, fill, and f32 <-> packed-f16 casts.
// Work is flattened over a 2-D grid of 256-wide workgroups.

// How y is indexed for element i: 0 = same shape (i), 1 = one row repeated
// (i % row_len), 2 = a single scalar.
{{COMMON}}

const BROADCAST: u32 = {{BROADCAST}}u;

fn op(x: f32, y: f32) -> f32 {
    return {{OP}};
}

struct Params {
    n: u32, row_len: u32, x_off: u32, y_off: u32,
    out_off: u32, _pad0: u32, alpha: f32, beta: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_f16: array<u32>;
@group(0) @binding(5) var<storage, read> x_f16: array<u32>;

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    var j = i;
    if (BROADCAST == 1u) { j = i % p.row_len; }
    if (BROADCAST == 2u) { j = 0u; }
    out[p.out_off + i] = op(x[p.x_off + i], y[p.y_off + j]);
}

// out = alpha * x + beta * out, in place on out.
@compute @workgroup_size(256)
fn axpby(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let o = p.out_off + i;
    out[o] = p.alpha * x[p.x_off + i] + p.beta * out[o];
}

// out = alpha * x + beta.
@compute @workgroup_size(256)
fn affine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    out[p.out_off + i] = p.alpha * x[p.x_off + i] + p.beta;
}

// out = alpha.
@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    out[p.out_off + i] = p.alpha;
}

// One invocation per output word (two halves). out_off is even; an odd
// count keeps the neighbouring half of the last word intact.
@compute @workgroup_size(256)
fn to_f16(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let w = flat_index(wid, nwg, lid);
    let e = 2u * w;
    if (e >= p.n) {
        return;
    }
    let word = p.out_off / 2u + w;
    let lo = x[p.x_off + e];
    var hi: f32;
    if (e + 1u < p.n) {
        hi = x[p.x_off + e + 1u];
    } else {
        hi = unpack2x16float(out_f16[word]).y;
    }
    out_f16[word] = pack2x16float(vec2<f32>(lo, hi));
}

@compute @workgroup_size(256)
fn to_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let e = p.x_off + i;
    out[p.out_off + i] = unpack2x16float(x_f16[e / 2u])[e % 2u];
}
