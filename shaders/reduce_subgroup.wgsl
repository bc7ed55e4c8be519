// Workgroup reductions through subgroups: each subgroup reduces in
// registers, its invocation 0 publishes the result, and after one barrier
// every subgroup reduces the published results again, each invocation
// loading a few of them (one on a 32-wide GPU subgroup, four on lavapipe's
// 8-wide ones). 2 barriers instead of the tree's 10, and every subgroup
// reduces the same values in the same lanes, so all invocations get the
// same result. Which slot is whose comes from the entry point's subgroup
// builtins, so nothing here assumes how invocations map to subgroups
// (on DX12 naga derives subgroup_id from the local index and the wave
// size, which assumes waves of consecutive invocations, as drivers make
// them).

var<private> subgroup_slot: u32;
var<private> subgroup_count: u32;
var<private> subgroup_lane: u32;
var<private> subgroup_width: u32;

fn workgroup_sum(v: f32, lane: u32) -> f32 {
    let part = subgroupAdd(v);
    if (subgroup_lane == 0u) {
        scratch[subgroup_slot] = part;
    }
    workgroupBarrier();
    var mine = 0.0;
    for (var s = subgroup_lane; s < subgroup_count; s += subgroup_width) {
        mine += scratch[s];
    }
    let total = subgroupAdd(mine);
    workgroupBarrier();
    return total;
}

fn workgroup_max(v: f32, lane: u32) -> f32 {
    let part = subgroupMax(v);
    if (subgroup_lane == 0u) {
        scratch[subgroup_slot] = part;
    }
    workgroupBarrier();
    // Lanes past the published results repeat one (max is idempotent).
    var mine = scratch[min(subgroup_lane, subgroup_count - 1u)];
    for (var s = subgroup_lane + subgroup_width; s < subgroup_count; s += subgroup_width) {
        mine = max(mine, scratch[s]);
    }
    let best = subgroupMax(mine);
    workgroupBarrier();
    return best;
}
