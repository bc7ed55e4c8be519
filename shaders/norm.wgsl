// LayerNorm and RMSNorm over the last dimension and their input gradients.
// LANES invocations share a row: 256 (the workgroup reduces one row; GPUs)
// or 1 (each invocation owns a row and no barrier runs: CPU adapters,
// where per-invocation cost dominates). LayerNorm uses two passes (mean,
// then centred variance) for accuracy.

{{COMMON}}

const LANES: u32 = {{LANES}}u;

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

// This invocation's row (clamped to the last: rows past the end compute a
// copy and skip their stores, so every invocation reaches the barriers)
// and its lane within the row.
struct RowAt {
    row: u32,
    lane: u32,
    live: bool,
}

fn row_at(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> RowAt {
    var row = flat_group(wid, nwg);
    var lane = lid.x;
    if (LANES == 1u) {
        row = row * 256u + lid.x;
        lane = 0u;
    }
    return RowAt(min(row, p.rows - 1u), lane, row < p.rows);
}

fn row_sum(v: f32, lane: u32) -> f32 {
    if (LANES == 1u) {
        return v;
    }
    return workgroup_sum(v, lane);
}

// (mean, 1 / sqrt(var + eps)) of the row at `base`, two passes.
fn mean_inv_std(base: u32, lane: u32) -> vec2<f32> {
    let n = f32(p.row_len);
    var s = 0.0;
    for (var j = lane; j < p.row_len; j += LANES) {
        s += x[base + j];
    }
    let mean = row_sum(s, lane) / n;
    var sq = 0.0;
    for (var j = lane; j < p.row_len; j += LANES) {
        let d = x[base + j] - mean;
        sq += d * d;
    }
    return vec2<f32>(mean, inverseSqrt(row_sum(sq, lane) / n + p.eps));
}

// 1 / sqrt(mean(x^2) + eps) of the row at `base`.
fn inv_rms_of(base: u32, lane: u32) -> f32 {
    var sq = 0.0;
    for (var j = lane; j < p.row_len; j += LANES) {
        let v = x[base + j];
        sq += v * v;
    }
    return inverseSqrt(row_sum(sq, lane) / f32(p.row_len) + p.eps);
}

// y = (x - mean) / sqrt(var + eps) * gain + bias
@compute @workgroup_size(256)
fn layer_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let at = row_at(wid, nwg, lid);
    let base = p.x_off + at.row * p.row_len;
    let stats = mean_inv_std(base, at.lane);
    let out_base = p.out_off + at.row * p.row_len;
    if (at.live) {
        for (var j = at.lane; j < p.row_len; j += LANES) {
            out[out_base + j] = (x[base + j] - stats.x) * stats.y * gain[j] + bias[j];
        }
    }
}

// y = x / sqrt(mean(x^2) + eps) * gain   (Llama)
@compute @workgroup_size(256)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let at = row_at(wid, nwg, lid);
    let base = p.x_off + at.row * p.row_len;
    let inv_rms = inv_rms_of(base, at.lane);
    let out_base = p.out_off + at.row * p.row_len;
    if (at.live) {
        for (var j = at.lane; j < p.row_len; j += LANES) {
            out[out_base + j] = x[base + j] * inv_rms * gain[j];
        }
    }
}

// dx = (g - mean(g) - xhat * mean(g * xhat)) / sigma, with g = gain * dy
// and xhat = (x - mean) / sigma.
@compute @workgroup_size(256)
fn layer_norm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let at = row_at(wid, nwg, lid);
    let base = p.x_off + at.row * p.row_len;
    let gbase = p.out_off + at.row * p.row_len;
    let dbase = p.dy_off + at.row * p.row_len;
    let n = f32(p.row_len);
    let stats = mean_inv_std(base, at.lane);
    let mean = stats.x;
    let inv_std = stats.y;
    var sum_g = 0.0;
    var sum_gx = 0.0;
    for (var j = at.lane; j < p.row_len; j += LANES) {
        let g = gain[j] * dy[dbase + j];
        sum_g += g;
        sum_gx += g * (x[base + j] - mean) * inv_std;
    }
    let mean_g = row_sum(sum_g, at.lane) / n;
    let mean_gx = row_sum(sum_gx, at.lane) / n;
    if (at.live) {
        for (var j = at.lane; j < p.row_len; j += LANES) {
            let xhat = (x[base + j] - mean) * inv_std;
            out[gbase + j] = (gain[j] * dy[dbase + j] - mean_g - xhat * mean_gx) * inv_std;
        }
    }
}

// dx = (g - xhat * mean(g * xhat)) / rms, with g = gain * dy, xhat = x / rms.
@compute @workgroup_size(256)
fn rms_norm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let at = row_at(wid, nwg, lid);
    let base = p.x_off + at.row * p.row_len;
    let gbase = p.out_off + at.row * p.row_len;
    let dbase = p.dy_off + at.row * p.row_len;
    let inv_rms = inv_rms_of(base, at.lane);
    var sum_gx = 0.0;
    for (var j = at.lane; j < p.row_len; j += LANES) {
        sum_gx += gain[j] * dy[dbase + j] * x[base + j] * inv_rms;
    }
    let mean_gx = row_sum(sum_gx, at.lane) / f32(p.row_len);
    if (at.live) {
        for (var j = at.lane; j < p.row_len; j += LANES) {
            out[gbase + j] = (gain[j] * dy[dbase + j] - x[base + j] * inv_rms * mean_gx) * inv_rms;
        }
    }
}
