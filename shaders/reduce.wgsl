// Row reductions: out[r] = alpha * reduce_j f(x[r, j]), one 256-wide
// workgroup per row.

{{COMMON}}

// 0 = sum, 1 = max, 2 = sum of squares.
const OP: u32 = {{OP}}u;

struct Params {
    rows: u32, row_len: u32, x_off: u32, out_off: u32,
    alpha: f32, _pad0: u32, _pad1: u32, _pad2: u32,
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
    let base = p.x_off + row * p.row_len;
    var result: f32;
    if (OP == 1u) {
        var acc = neg_inf();
        for (var j = lid.x; j < p.row_len; j += 256u) {
            acc = max(acc, x[base + j]);
        }
        result = workgroup_max(acc, lid.x);
    } else {
        var acc = 0.0;
        for (var j = lid.x; j < p.row_len; j += 256u) {
            let v = x[base + j];
            if (OP == 2u) { acc += v * v; } else { acc += v; }
        }
        result = workgroup_sum(acc, lid.x);
    }
    if (lid.x == 0u) {
        out[p.out_off + row] = p.alpha * result;
    }
}
