// Workgroup reductions as a tree through workgroup memory: 8 halving steps,
// 10 barriers. Every adapter has them.

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
