// Activation functions, elementwise: `apply` computes act(x); `gated`
// computes act(gate) * up (SwiGLU when act is silu) from rows holding
// gate | up side by side (one product made both); the `_backward` entries
// turn the output gradient dy into input gradients.

{{COMMON}}

fn act(v: f32) -> f32 {
    return {{ACT}}(v);
}

fn act_grad(v: f32) -> f32 {
    return {{ACT}}_grad(v);
}

struct Params {
    n: u32, x_off: u32, out_off: u32, dy_off: u32,
    // Gated: columns of gate (and of up) per row.
    width: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;

{{ACTIVATIONS}}
@compute @workgroup_size(256)
fn apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    out[p.out_off + i] = act(x[p.x_off + i]);
}

@compute @workgroup_size(256)
fn gated(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let gate = gate_index(i);
    out[p.out_off + i] = act(x[p.x_off + gate]) * x[p.x_off + gate + p.width];
}

// Element i of a [rows, width] result sits at this index of gate | up rows.
fn gate_index(i: u32) -> u32 {
    let row = i / p.width;
    return i + row * p.width;
}

// dx = dy * act'(x)
@compute @workgroup_size(256)
fn apply_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    out[p.out_off + i] = dy[p.dy_off + i] * act_grad(x[p.x_off + i]);
}

// d_gate = dy * up * act'(gate), d_up = dy * act(gate), written as
// d_gate | d_up rows like the input.
@compute @workgroup_size(256)
fn gated_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let gate = gate_index(i);
    let g = x[p.x_off + gate];
    let d = dy[p.dy_off + i];
    out[p.out_off + gate] = d * x[p.x_off + gate + p.width] * act_grad(g);
    out[p.out_off + gate + p.width] = d * act(g);
}
