// LayerNorm and RMSNorm over the last dimension and their input gradients,
// one 256-wide workgroup per row. LayerNorm uses two passes (mean, then
// centred variance) for accuracy.

{{COMMON}}

struct Params {
    rows: u32, row_len: u32, x_off: u32, out_off: u32,
    eps: f32, dy_off: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gain: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// Gradient of the loss w.r.t. the norm's output (backward entries).
@group(0) @binding(5) var<storage, read> dy: array<f32>;

// (mean, 1 / sqrt(var + eps)) of the row at `base`, two passes.
fn mean_inv_std(base: u32, lane: u32) -> vec2<f32> {
    let n = f32(p.row_len);
    var s = 0.0;
    for (var j = lane; j < p.row_len; j += 256u) {
        s += x[base + j];
    }
    let mean = workgroup_sum(s, lane) / n;
    var sq = 0.0;
    for (var j = lane; j < p.row_len; j += 256u) {
        let d = x[base + j] - mean;
        sq += d * d;
    }
    return vec2<f32>(mean, inverseSqrt(workgroup_sum(sq, lane) / n + p.eps));
}

// 1 / sqrt(mean(x^2) + eps) of the row at `base`.
fn inv_rms_of(base: u32, lane: u32) -> f32 {
    var sq = 0.0;
    for (var j = lane; j < p.row_len; j += 256u) {
        let v = x[base + j];
        sq += v * v;
    }
    return inverseSqrt(workgroup_sum(sq, lane) / f32(p.row_len) + p.eps);
}

// y = (x - mean) / sqrt(var + eps) * gain + bias
@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = p.x_off + row * p.row_len;
    let stats = mean_inv_std(base, lid.x);
    let mean = stats.x;
    let inv_std = stats.y;
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
    let inv_rms = inv_rms_of(base, lid.x);
    let out_base = p.out_off + row * p.row_len;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        out[out_base + j] = x[base + j] * inv_rms * gain[j];
    }
}

// dx = (g - mean(g) - xhat * mean(g * xhat)) / sigma, with g = gain * dy
// and xhat = (x - mean) / sigma.
@compute @workgroup_size(256)
fn layer_norm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = p.x_off + row * p.row_len;
    let gbase = p.out_off + row * p.row_len;
    let dbase = p.dy_off + row * p.row_len;
    let n = f32(p.row_len);
    let stats = mean_inv_std(base, lid.x);
    let mean = stats.x;
    let inv_std = stats.y;
    var sum_g = 0.0;
    var sum_gx = 0.0;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        let g = gain[j] * dy[dbase + j];
        sum_g += g;
        sum_gx += g * (x[base + j] - mean) * inv_std;
    }
    let mean_g = workgroup_sum(sum_g, lid.x) / n;
    let mean_gx = workgroup_sum(sum_gx, lid.x) / n;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        let xhat = (x[base + j] - mean) * inv_std;
        out[gbase + j] = (gain[j] * dy[dbase + j] - mean_g - xhat * mean_gx) * inv_std;
    }
}

// dx = (g - xhat * mean(g * xhat)) / rms, with g = gain * dy, xhat = x / rms.
@compute @workgroup_size(256)
fn rms_norm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    let base = p.x_off + row * p.row_len;
    let gbase = p.out_off + row * p.row_len;
    let dbase = p.dy_off + row * p.row_len;
    let inv_rms = inv_rms_of(base, lid.x);
    var sum_gx = 0.0;
    for (var j = lid.x; j < p.row_len; j += 256u) {
        sum_gx += gain[j] * dy[dbase + j] * x[base + j] * inv_rms;
    }
    let mean_gx = workgroup_sum(sum_gx, lid.x) / f32(p.row_len);
    for (var j = lid.x; j < p.row_len; j += 256u) {
        out[gbase + j] = (gain[j] * dy[dbase + j] - x[base + j] * inv_rms * mean_gx) * inv_rms;
    }
}
