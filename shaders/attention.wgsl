// Attention pieces: rotary position embedding (in place on q and k), causal
// multi-head attention with per-sequence key bounds (padding) and grouped KV
// heads, and its backward pass.
//
// q, k and v are read through (offset, row stride, head stride) so fused
// projections (GPT-2's [q|k|v] blocks, GPT-NeoX's per-head [q k v]) and
// separate ones are read in place without copies.

{{COMMON}}

// Keys one query can attend to in the backward pass (probabilities live in
// workgroup memory); the forward kernels take the softmax online.
const MAX_KEYS: u32 = 2048u;
const MAX_HEAD_DIM: u32 = 256u;

// Queries and keys may come in different row layouts: sequence b's queries
// are rows b·q_seq + i of q (and of the output), its keys rows b·kv_seq + j
// of k and v. Query i sits at position bounds[4b + 2] + i of the key
// layout: 0 for a whole batch; the first changed row when only the rows
// from there on are recomputed and the earlier keys come from a cache.
struct AttendParams {
    q_seq: u32, n_heads: u32, kv_group: u32, head_dim: u32,
    q_off: u32, q_row: u32, q_head: u32, k_off: u32,
    k_row: u32, k_head: u32, v_off: u32, v_row: u32,
    v_head: u32, out_row: u32, scale: f32, kv_seq: u32,
}

@group(0) @binding(0) var<uniform> ap: AttendParams;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
// Per sequence: first real key, one past the last real key, the key
// position of query 0, and a pad word.
@group(0) @binding(4) var<storage, read> bounds: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> probs: array<f32, 2048>;
var<workgroup> q_cache: array<f32, 256>;

// The keys query i of sequence b sees: [start, end).
fn key_range(b: u32, i: u32) -> vec2<u32> {
    let start = bounds[4u * b];
    return vec2<u32>(start, min(bounds[4u * b + 1u], bounds[4u * b + 2u] + i + 1u));
}

// Fills probs[start..end] with exp(score - max) for query i of head h of
// sequence b (q is cached, pre-scaled, in q_cache) and returns their sum.
// The barriers inside publish probs to the whole workgroup.
fn unnormalised_probs(b: u32, h: u32, i: u32, start: u32, end: u32, lane: u32) -> f32 {
    let row = b * ap.q_seq + i;
    let kv = h / ap.kv_group;
    for (var d = lane; d < ap.head_dim; d += 256u) {
        q_cache[d] = q[ap.q_off + row * ap.q_row + h * ap.q_head + d] * ap.scale;
    }
    workgroupBarrier();
    var local_max = neg_inf();
    for (var j = start + lane; j < end; j += 256u) {
        let k_base = ap.k_off + (b * ap.kv_seq + j) * ap.k_row + kv * ap.k_head;
        var s = 0.0;
        for (var d = 0u; d < ap.head_dim; d++) {
            s += q_cache[d] * k[k_base + d];
        }
        probs[j] = s;
        local_max = max(local_max, s);
    }
    let row_max = workgroup_max(local_max, lane);
    var local_sum = 0.0;
    for (var j = start + lane; j < end; j += 256u) {
        let e = exp(probs[j] - row_max);
        probs[j] = e;
        local_sum += e;
    }
    return workgroup_sum(local_sum, lane);
}

// Attention for GPUs, flash-style: one workgroup per ATTEND_QUERIES
// queries of one head and sequence, ATTEND_LANES invocations per query.
// Keys and values come in tiles of `attend_keys()` (at most 32, and few
// enough that a tile of head_dim + 1 floats a key fits attend_kv; the pad
// keeps the lanes of a query reading distinct banks) through workgroup memory, and
// the softmax is taken online (running maximum and sum, the accumulated
// output rescaled as the maximum grows), so the key count is unbounded by
// workgroup memory and each key and value is read once per workgroup
// instead of once per query. Lane l of a query scores the tile's keys l,
// l + 16 and accumulates output dimensions l, l + 16, ...
const ATTEND_QUERIES: u32 = 16u;
const ATTEND_LANES: u32 = 16u;
const ATTEND_KV_FLOATS: u32 = 3072u;
// Masked scores, and the running maximum before any key, take this finite
// floor rather than -inf (WGSL lets implementations assume no infinities):
// once a query's maximum is a real score its masked keys weigh
// exp(floor - max) = 0. Every query's first tile holds its first key (all
// of a sequence's queries start at the same key), so only a padding query,
// which sees no key, ever runs on the floor, and its output is set to 0.
const SCORE_FLOOR: f32 = -3.0e38;
var<workgroup> attend_kv: array<f32, ATTEND_KV_FLOATS>;
var<workgroup> attend_p: array<f32, 512>;

// Keys per tile: the largest power of two up to 32 whose rows fit attend_kv
// (32 for head_dim 64, 16 for 96 or 128, 8 for 256).
fn attend_keys() -> u32 {
    return min(32u, 1u << firstLeadingBit(ATTEND_KV_FLOATS / (ap.head_dim + 1u)));
}

// Copies keys (or values) j0 .. j0 + attend_keys() of kv head kv of sequence
// b into attend_kv (rows of head_dim + 1; zero past `end`).
fn load_key_tile(src_is_v: bool, b: u32, kv: u32, j0: u32, end: u32, lane: u32) {
    let d_head = ap.head_dim;
    for (var e = lane; e < attend_keys() * d_head; e += 256u) {
        let jj = e / d_head;
        let d = e % d_head;
        let j = j0 + jj;
        var value = 0.0;
        if (j < end) {
            if (src_is_v) {
                value = v[ap.v_off + (b * ap.kv_seq + j) * ap.v_row + kv * ap.v_head + d];
            } else {
                value = k[ap.k_off + (b * ap.kv_seq + j) * ap.k_row + kv * ap.k_head + d];
            }
        }
        attend_kv[jj * (d_head + 1u) + d] = value;
    }
}

@compute @workgroup_size(256)
fn attend(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let h = wid.y;
    let b = wid.z;
    let r = lid.x / ATTEND_LANES;
    let lane = lid.x % ATTEND_LANES;
    let i = wid.x * ATTEND_QUERIES + r;
    let live = i < ap.q_seq;
    let kv = h / ap.kv_group;
    let d_head = ap.head_dim;
    let stride = d_head + 1u;
    let tile = attend_keys();
    var range = vec2<u32>(0u, 0u);
    if (live) {
        range = key_range(b, i);
    }
    // Every query of a sequence starts at the same key; the last live one
    // of the workgroup ends last.
    let span = key_range(b, min(wid.x * ATTEND_QUERIES + ATTEND_QUERIES, ap.q_seq) - 1u);
    let q_base = ap.q_off + (b * ap.q_seq + i) * ap.q_row + h * ap.q_head;
    var run_max = SCORE_FLOOR;
    var run_sum = 0.0;
    var acc: array<f32, 16>;
    for (var t = 0u; t < 16u; t++) {
        acc[t] = 0.0;
    }
    for (var j0 = span.x; j0 < span.y; j0 += tile) {
        load_key_tile(false, b, kv, j0, span.y, lid.x);
        workgroupBarrier();
        // This lane's keys' scores (at most two), the floor outside the query's keys.
        var own0 = SCORE_FLOOR;
        var own1 = SCORE_FLOOR;
        for (var u = 0u; u < 2u; u++) {
            let jj = lane + u * ATTEND_LANES;
            let j = j0 + jj;
            if (live && jj < tile && j >= range.x && j < range.y) {
                var dot = 0.0;
                for (var d = 0u; d < d_head; d++) {
                    dot += q[q_base + d] * attend_kv[jj * stride + d];
                }
                if (u == 0u) {
                    own0 = dot * ap.scale;
                } else {
                    own1 = dot * ap.scale;
                }
            }
        }
        if (lane < tile) {
            attend_p[r * tile + lane] = own0;
        }
        if (lane + ATTEND_LANES < tile) {
            attend_p[r * tile + lane + ATTEND_LANES] = own1;
        }
        workgroupBarrier();
        var tile_max = SCORE_FLOOR;
        for (var jj = 0u; jj < tile; jj++) {
            tile_max = max(tile_max, attend_p[r * tile + jj]);
        }
        let new_max = max(run_max, tile_max);
        // 0 when the first real score arrives (from the floor), else the usual rescale.
        let factor = exp(run_max - new_max);
        run_sum *= factor;
        for (var t = 0u; t < 16u; t++) {
            acc[t] *= factor;
        }
        run_max = new_max;
        workgroupBarrier();
        // Probabilities (unnormalised) replace the scores; the values
        // replace the keys.
        if (lane < tile) {
            attend_p[r * tile + lane] = exp(own0 - new_max);
        }
        if (lane + ATTEND_LANES < tile) {
            attend_p[r * tile + lane + ATTEND_LANES] = exp(own1 - new_max);
        }
        load_key_tile(true, b, kv, j0, span.y, lid.x);
        workgroupBarrier();
        for (var jj = 0u; jj < tile; jj++) {
            let p = attend_p[r * tile + jj];
            run_sum += p;
            for (var t = 0u; t < 16u; t++) {
                let d = lane + t * ATTEND_LANES;
                if (d < d_head) {
                    acc[t] += p * attend_kv[jj * stride + d];
                }
            }
        }
        // The next tile overwrites attend_kv and attend_p.
        workgroupBarrier();
    }
    if (live) {
        let row = b * ap.q_seq + i;
        for (var t = 0u; t < 16u; t++) {
            let d = lane + t * ATTEND_LANES;
            // A padding query before its sequence starts sees no keys: output 0.
            if (d < d_head) {
                out[row * ap.out_row + h * d_head + d] = select(0.0, acc[t] / run_sum, range.y > range.x);
            }
        }
    }
}

// The query of one invocation in the one-invocation-per-query kernels: x
// the query, y its head, z its sequence.
struct QueryOf {
    b: u32, h: u32, i: u32, row: u32, kv: u32, q_base: u32,
}

fn query_of(gid: vec3<u32>) -> QueryOf {
    let row = gid.z * ap.q_seq + gid.x;
    return QueryOf(gid.z, gid.y, gid.x, row, gid.y / ap.kv_group, ap.q_off + row * ap.q_row + gid.y * ap.q_head);
}

// scale · q·k for the query whose head starts at q[q_base] and key j of
// sequence b's kv head kv (the one-invocation-per-query kernels).
fn scaled_score(q_base: u32, b: u32, kv: u32, j: u32) -> f32 {
    let k_base = ap.k_off + (b * ap.kv_seq + j) * ap.k_row + kv * ap.k_head;
    var s = 0.0;
    for (var d = 0u; d < ap.head_dim; d++) {
        s += q[q_base + d] * k[k_base + d];
    }
    return s * ap.scale;
}

// The same attention with one invocation per (query, head, sequence) and
// no workgroup memory or barriers (online softmax over the keys): for CPU
// adapters, where each invocation and barrier is expensive.
@compute @workgroup_size(64)
fn attend_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= ap.q_seq) {
        return;
    }
    let at = query_of(gid);
    let range = key_range(at.b, at.i);
    var acc: array<f32, 256>;
    var running_max = neg_inf();
    var total = 0.0;
    for (var j = range.x; j < range.y; j++) {
        let s = scaled_score(at.q_base, at.b, at.kv, j);
        let new_max = max(running_max, s);
        let rescale = exp(running_max - new_max);
        let weight = exp(s - new_max);
        total = total * rescale + weight;
        let v_base = ap.v_off + (at.b * ap.kv_seq + j) * ap.v_row + at.kv * ap.v_head;
        for (var d = 0u; d < ap.head_dim; d++) {
            acc[d] = acc[d] * rescale + weight * v[v_base + d];
        }
        running_max = new_max;
    }
    for (var d = 0u; d < ap.head_dim; d++) {
        // A padding query before its sequence starts sees no keys: output 0.
        out[at.row * ap.out_row + at.h * ap.head_dim + d] = select(0.0, acc[d] / total, range.y > range.x);
    }
}

struct RotaryParams {
    rows: u32, n_heads: u32, rot_half: u32, interleaved: u32,
    off: u32, row_stride: u32, head_stride: u32, inverse: u32,
}

@group(0) @binding(0) var<uniform> rp: RotaryParams;
@group(0) @binding(6) var<storage, read_write> x: array<f32>;
// [position][rot_half] pairs of (cos, sin), computed on the CPU.
@group(0) @binding(7) var<storage, read> table: array<f32>;
@group(0) @binding(8) var<storage, read> positions: array<u32>;

// One invocation per (row, head, rotated pair). GPT-J (and GGUF) rotate
// adjacent pairs (2i, 2i+1); GPT-NeoX and Llama rotate (i, i + half).
@compute @workgroup_size(256)
fn rotary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let idx = flat_index(wid, nwg, lid);
    let pair = idx % rp.rot_half;
    let head = (idx / rp.rot_half) % rp.n_heads;
    let row = idx / (rp.rot_half * rp.n_heads);
    if (row >= rp.rows) {
        return;
    }
    let t = (positions[row] * rp.rot_half + pair) * 2u;
    let c = table[t];
    // The inverse rotation (the backward pass of a rotation) negates the angle.
    let s = select(table[t + 1u], -table[t + 1u], rp.inverse != 0u);
    let base = rp.off + row * rp.row_stride + head * rp.head_stride;
    var i1 = base + pair;
    var i2 = base + pair + rp.rot_half;
    if (rp.interleaved != 0u) {
        i1 = base + 2u * pair;
        i2 = i1 + 1u;
    }
    let x1 = x[i1];
    let x2 = x[i2];
    x[i1] = x1 * c - x2 * s;
    x[i2] = x2 * c + x1 * s;
}

// Backward pass. With S = scale * q k^T, P = softmax(S), O = P v and dO given:
//   dP = dO v^T, dS = P * (dP - rowsum(P * dP)),
//   dq = scale * dS k, dk = scale * dS^T q, dv = P^T dO.
// `attend_backward_query` (one workgroup per query, head, sequence) writes
// dq and stores P and dS in [sequence][head][query][key] scratch buffers;
// `attend_backward_key` (one workgroup per key, kv head, sequence) sums
// over queries and over the query heads sharing the kv head. Gradients are
// for the keys that have queries' rows (key i' at position
// bounds[4b + 2] + i'): with a key cache, the cached keys are constants.
@group(0) @binding(9) var<storage, read> d_out: array<f32>;
@group(0) @binding(10) var<storage, read_write> dq: array<f32>;
@group(0) @binding(11) var<storage, read_write> dk: array<f32>;
@group(0) @binding(12) var<storage, read_write> dv: array<f32>;
@group(0) @binding(13) var<storage, read_write> probs_all: array<f32>;
@group(0) @binding(14) var<storage, read_write> dscores_all: array<f32>;

var<workgroup> dout_cache: array<f32, 256>;

// Offset of (sequence b, head h, query i, key 0) in the scratch buffers.
fn scratch_row(b: u32, h: u32, i: u32) -> u32 {
    return ((b * ap.n_heads + h) * ap.q_seq + i) * ap.kv_seq;
}

@compute @workgroup_size(256)
fn attend_backward_query(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let i = wid.x;
    let h = wid.y;
    let b = wid.z;
    let range = key_range(b, i);
    let start = range.x;
    let end = range.y;
    let row = b * ap.q_seq + i;
    let kv = h / ap.kv_group;
    for (var d = lid.x; d < ap.head_dim; d += 256u) {
        dout_cache[d] = d_out[row * ap.out_row + h * ap.head_dim + d];
    }
    let total = unnormalised_probs(b, h, i, start, end, lid.x);

    // P and dP; rowsum(P * dP).
    let srow = scratch_row(b, h, i);
    var local_dot = 0.0;
    for (var j = start + lid.x; j < end; j += 256u) {
        let pj = probs[j] / total;
        let v_base = ap.v_off + (b * ap.kv_seq + j) * ap.v_row + kv * ap.v_head;
        var dp = 0.0;
        for (var d = 0u; d < ap.head_dim; d++) {
            dp += dout_cache[d] * v[v_base + d];
        }
        probs_all[srow + j] = pj;
        dscores_all[srow + j] = dp;
        local_dot += pj * dp;
    }
    let dot = workgroup_sum(local_dot, lid.x);
    for (var j = start + lid.x; j < end; j += 256u) {
        let ds = probs_all[srow + j] * (dscores_all[srow + j] - dot);
        dscores_all[srow + j] = ds;
        probs[j] = ds;
    }
    workgroupBarrier();
    for (var d = lid.x; d < ap.head_dim; d += 256u) {
        var acc = 0.0;
        for (var j = start; j < end; j++) {
            acc += probs[j] * k[ap.k_off + (b * ap.kv_seq + j) * ap.k_row + kv * ap.k_head + d];
        }
        dq[ap.q_off + row * ap.q_row + h * ap.q_head + d] = ap.scale * acc;
    }
}

// The same as `attend_backward_query` with one invocation per (query,
// head, sequence) and no workgroup memory or barriers, for CPU adapters:
// the scores, P and dS go through this query's rows of the scratch buffers.
@compute @workgroup_size(64)
fn attend_backward_query_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= ap.q_seq) {
        return;
    }
    let at = query_of(gid);
    let range = key_range(at.b, at.i);
    let dout_base = at.row * ap.out_row + at.h * ap.head_dim;
    let srow = scratch_row(at.b, at.h, at.i);
    var row_max = neg_inf();
    for (var j = range.x; j < range.y; j++) {
        let s = scaled_score(at.q_base, at.b, at.kv, j);
        probs_all[srow + j] = s;
        row_max = max(row_max, s);
    }
    var total = 0.0;
    for (var j = range.x; j < range.y; j++) {
        let e = exp(probs_all[srow + j] - row_max);
        probs_all[srow + j] = e;
        total += e;
    }
    // P and dP; rowsum(P * dP).
    var dot = 0.0;
    for (var j = range.x; j < range.y; j++) {
        let pj = probs_all[srow + j] / total;
        let v_base = ap.v_off + (at.b * ap.kv_seq + j) * ap.v_row + at.kv * ap.v_head;
        var dp = 0.0;
        for (var d = 0u; d < ap.head_dim; d++) {
            dp += d_out[dout_base + d] * v[v_base + d];
        }
        probs_all[srow + j] = pj;
        dscores_all[srow + j] = dp;
        dot += pj * dp;
    }
    var acc: array<f32, 256>;
    for (var j = range.x; j < range.y; j++) {
        let ds = probs_all[srow + j] * (dscores_all[srow + j] - dot);
        dscores_all[srow + j] = ds;
        let k_base = ap.k_off + (at.b * ap.kv_seq + j) * ap.k_row + at.kv * ap.k_head;
        for (var d = 0u; d < ap.head_dim; d++) {
            acc[d] += ds * k[k_base + d];
        }
    }
    for (var d = 0u; d < ap.head_dim; d++) {
        dq[at.q_base + d] = ap.scale * acc[d];
    }
}

// Gradients of the key with query row i2 (position j), element d: (dk, dv)
// before dk's scale.
fn key_grads(i2: u32, kv: u32, b: u32, d: u32) -> vec2<f32> {
    var acc = vec2<f32>(0.0, 0.0);
    let j = bounds[4u * b + 2u] + i2;
    if (j < bounds[4u * b] || j >= bounds[4u * b + 1u]) {
        return acc;
    }
    for (var g = 0u; g < ap.kv_group; g++) {
        let h = kv * ap.kv_group + g;
        // Every query at or after the key sees it (padding queries after the
        // sequence's end attend to its real tokens too).
        for (var i = i2; i < ap.q_seq; i++) {
            let srow = scratch_row(b, h, i);
            let qrow = b * ap.q_seq + i;
            acc.x += dscores_all[srow + j] * q[ap.q_off + qrow * ap.q_row + h * ap.q_head + d];
            acc.y += probs_all[srow + j] * d_out[qrow * ap.out_row + h * ap.head_dim + d];
        }
    }
    return acc;
}

// dk and dv are laid out like k and v within a row, with the queries' rows.
@compute @workgroup_size(256)
fn attend_backward_key(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.z * ap.q_seq + wid.x;
    for (var d = lid.x; d < ap.head_dim; d += 256u) {
        let g = key_grads(wid.x, wid.y, wid.z, d);
        dk[ap.k_off + row * ap.k_row + wid.y * ap.k_head + d] = ap.scale * g.x;
        dv[ap.v_off + row * ap.v_row + wid.y * ap.v_head + d] = g.y;
    }
}

// The same when dk and dv are one fused buffer (WebGPU forbids binding it
// writably twice): both go through `dk`.
@compute @workgroup_size(256)
fn attend_backward_key_fused(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let row = wid.z * ap.q_seq + wid.x;
    for (var d = lid.x; d < ap.head_dim; d += 256u) {
        let g = key_grads(wid.x, wid.y, wid.z, d);
        dk[ap.k_off + row * ap.k_row + wid.y * ap.k_head + d] = ap.scale * g.x;
        dk[ap.v_off + row * ap.v_row + wid.y * ap.v_head + d] = g.y;
    }
}
