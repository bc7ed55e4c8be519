// Row-wise softmax / log-softmax, one 256-wide workgroup per row, with an
// optional causal mask for attention scores: rows come in blocks of
// `block` queries and query q may see keys 0 ..= q + shift (shift = number
// of earlier cached positions). Masked entries get probability 0
// (log-probability -inf).

{{COMMON}}

const LOG: bool = {{LOG}};
const CAUSAL: bool = {{CAUSAL}};

struct Params {
    rows: u32, row_len: u32, x_off: u32, out_off: u32,
    block: u32, shift: u32, row_base: u32, _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let row = flat_group(wid, nwg);
    if (row >= p.rows) {
        return;
    }
    var visible = p.row_len;
    if (CAUSAL) {
        visible = min(p.row_len, (p.row_base + row) % p.block + p.shift + 1u);
    }
    let base = p.x_off + row * p.row_len;
    let out_base = p.out_off + row * p.row_len;

    var local_max = neg_inf();
    for (var j = lid.x; j < visible; j += 256u) {
        local_max = max(local_max, x[base + j]);
    }
    let row_max = workgroup_max(local_max, lid.x);

    var local_sum = 0.0;
    for (var j = lid.x; j < visible; j += 256u) {
        local_sum += exp(x[base + j] - row_max);
    }
    let total = workgroup_sum(local_sum, lid.x);

    let log_total = log(total);
    for (var j = lid.x; j < p.row_len; j += 256u) {
        var v: f32;
        if (j >= visible) {
            if (LOG) { v = neg_inf(); } else { v = 0.0; }
        } else if (LOG) {
            v = x[base + j] - row_max - log_total;
        } else {
            v = exp(x[base + j] - row_max) / total;
        }
        out[out_base + j] = v;
    }
}
