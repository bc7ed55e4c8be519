// LayerNorm and RMSNorm over the last dimension, one 256-wide workgroup per
// row. LayerNorm uses two passes (mean, then centred variance) for accuracy.

{{COMMON}}

struct Params {
    rows: u32, row_len: u32, x_off: u32, out_off: u32,
    eps: f32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gain: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// y = (x - mean) / sqrt(var + eps) * gain + bias
@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = p.x_off + row * p.row_len;
    let n = f32(p.row_len);
    var s = 0.0;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        s += x[base + j];
    }
    let mean = workgroup_sum(s, lid.x) / n;
    var sq = 0.0;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        let d = x[base + j] - mean;
        sq += d * d;
    }
    let inv_std = inverseSqrt(workgroup_sum(sq, lid.x) / n + p.eps);
    let out_base = p.out_off + row * p.row_len;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        out[out_base + j] = (x[base + j] - mean) * inv_std * gain[j] + bias[j];
    }
}

// y = x / sqrt(mean(x^2) + eps) * gain   (Llama)
@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = p.x_off + row * p.row_len;
    var sq = 0.0;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        let v = x[base + j];
        sq += v * v;
    }
    let inv_rms = inverseSqrt(workgroup_sum(sq, lid.x) / f32(p.row_len) + p.eps);
    let out_base = p.out_off + row * p.row_len;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        out[out_base + j] = x[base + j] * inv_rms * gain[j];
    }
}
