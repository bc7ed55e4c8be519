// Helpers shared by several kernel families; pasted where a family writes
// the COMMON template key. Workgroups are 256 invocations wide (one
// dimension). An entry point that reduces over its workgroup ends its
// parameters with the SUBGROUP_PARAMS key and starts with SUBGROUP_INIT
// (both empty without subgroups).

var<workgroup> scratch: array<f32, 256>;

// Index of this workgroup in a 2-D grid (grids are 2-D only to stay under
// the 65535 groups-per-dimension limit).
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

fn flat_index(wid: vec3<u32>, nwg: vec3<u32>, lid: vec3<u32>) -> u32 {
    return flat_group(wid, nwg) * 256u + lid.x;
}

// workgroup_sum(v, lane) and workgroup_max(v, lane): `v` reduced over the
// workgroup and returned to every invocation (called in workgroup-uniform
// control flow), through subgroups where the device has them
// (reduce_subgroup.wgsl) or a tree in workgroup memory (reduce_tree.wgsl).
{{WORKGROUP_REDUCTIONS}}
// The bits of -inf, loaded at run time: WGSL rejects -inf as a constant
// expression (Chrome's Tint enforces it; naga does not).
var<private> neg_inf_bits: u32 = 0xff800000u;

fn neg_inf() -> f32 {
    return bitcast<f32>(neg_inf_bits);
}
