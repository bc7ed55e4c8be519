// Helpers shared by several kernel families; pasted where a family writes
// {{COMMON}}. Workgroups are 256 invocations wide (one dimension).

var<workgroup> scratch: array<f32, 256>;

// Index of this workgroup in a 2-D grid (grids are 2-D only to stay under
// the 65535 groups-per-dimension limit).
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return flat_group(wid, nwg) * 256u + lid.x;
}

// Sum of `v` over the workgroup, returned to every invocation.
fn workgroup_sum(v: f32, lane: u32) -> f32 {
    scratch[lane] = v;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            scratch[lane] += scratch[lane + stride];
        }
        workgroupBarrier();
    }
    let total = scratch[0];
    workgroupBarrier();
    return total;
}

// Maximum of `v` over the workgroup, returned to every invocation.
fn workgroup_max(v: f32, lane: u32) -> f32 {
    scratch[lane] = v;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            scratch[lane] = max(scratch[lane], scratch[lane + stride]);
        }
        workgroupBarrier();
    }
    let best = scratch[0];
    workgroupBarrier();
    return best;
}

// The bits of -inf, loaded at run time: WGSL rejects -inf as a constant
// expression (Chrome's Tint enforces it; naga does not).
var<private> neg_inf_bits: u32 = 0xff800000u;

fn neg_inf() -> f32 {
    return bitcast<f32>(neg_inf_bits);
}
