// MEMIT's target-vector optimisation, batched over requests and kept on
// the GPU: δ_j of every request j is added to the residual stream at its
// subject rows (`add_delta`), the loss terms and their gradients w.r.t.
// the logits are formed from the log-probabilities of the rows the loss
// reads (`loss_rows`), and each request's δ takes its Adam step with weight
// decay and the norm clamp (`step`), or freezes once its loss is below the
// threshold, exactly where a one-request optimisation would stop.
//
// `plan` holds the u32 tables of a batch, at offsets given in Params:
//   meta    per loss row: request, target token (KL_ROW for the KL row), weight (f32 bits)
//   ranges  per request: first and one-past-last loss row, first and one-past-last lookup
//   lookups activation rows of the subject's last token, request by request
//   owner   per activation row: the request whose δ it receives, or NONE
// `state` is [request][3][d]: δ, Adam's first and second moments.
// `record` is [request] stop markers (0 while optimising, else the number
// of loss evaluations it ran, as f32) then [step][request][4] histories of
// (nll, kl, weight decay, target probability).

{{COMMON}}

const KL_ROW: u32 = 0xffffffffu;
const NONE: u32 = 0xffffffffu;

struct Params {
    n: u32, d: u32, vocab: u32, n_loss: u32,
    rows: u32, meta_off: u32, ranges_off: u32, lookups_off: u32,
    owner_off: u32, step: u32, last_step: u32, record_init: u32,
    kl_factor: f32, threshold: f32, weight_decay: f32, lr: f32,
    // Adam: 1 − β1, 1 − β2 and the bias corrections 1 − β^t of this step.
    one_minus_beta1: f32, one_minus_beta2: f32, bias1: f32, bias2: f32,
    clamp: f32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> plan: array<u32>;
@group(0) @binding(2) var<storage, read> base: array<f32>;
@group(0) @binding(3) var<storage, read_write> hidden: array<f32>;
@group(0) @binding(4) var<storage, read> log_probs: array<f32>;
@group(0) @binding(5) var<storage, read_write> kl_init: array<f32>;
@group(0) @binding(6) var<storage, read_write> d_logits: array<f32>;
@group(0) @binding(7) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(8) var<storage, read_write> state: array<f32>;
@group(0) @binding(9) var<storage, read_write> record: array<f32>;
@group(0) @binding(10) var<storage, read> d_hidden: array<f32>;
@group(0) @binding(11) var<storage, read> target_init: array<f32>;
@group(0) @binding(12) var<storage, read> row_loss_in: array<f32>;
@group(0) @binding(13) var<storage, read> state_in: array<f32>;

// hidden = base + δ of the row's request (one invocation per element).
@compute @workgroup_size(256)
fn add_delta(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = flat_index(wid, nwg, lid);
    if (i >= p.rows * p.d) {
        return;
    }
    let row = i / p.d;
    var v = base[i];
    let owner = plan[p.owner_off + row];
    if (owner != NONE) {
        v += state_in[owner * 3u * p.d + i % p.d];
    }
    hidden[i] = v;
}

// One workgroup per loss row. A target row adds w·(−log p[token]) to the
// loss, w·p[token] to the reported probability, and w·(p − onehot) to the
// logits' gradient. The KL row adds kl_factor·KL(p ‖ p_init) and
// kl_factor·p ⊙ (log p − log p_init − KL); at the first step it records
// p_init (and both are then zero).
@compute @workgroup_size(256)
fn loss_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let r = flat_group(wid, nwg);
    if (r >= p.n_loss) {
        return;
    }
    let request = plan[p.meta_off + 3u * r];
    // Loaded uniformly: the KL branch below has barriers.
    let token = uniform_u32(plan[p.meta_off + 3u * r + 1u], lid.x);
    let weight = bitcast<f32>(plan[p.meta_off + 3u * r + 2u]);
    let base_lp = r * p.vocab;
    if (token != KL_ROW) {
        for (var j = lid.x; j < p.vocab; j += 256u) {
            let prob = exp(log_probs[base_lp + j]);
            d_logits[base_lp + j] = weight * (prob - select(0.0, 1.0, j == token));
        }
        if (lid.x == 0u) {
            let lp = log_probs[base_lp + token];
            row_loss[2u * r] = -weight * lp;
            row_loss[2u * r + 1u] = weight * exp(lp);
        }
        return;
    }
    let base_init = request * p.vocab;
    if (p.record_init != 0u) {
        for (var j = lid.x; j < p.vocab; j += 256u) {
            kl_init[base_init + j] = log_probs[base_lp + j];
            d_logits[base_lp + j] = 0.0;
        }
        if (lid.x == 0u) {
            row_loss[2u * r] = 0.0;
            row_loss[2u * r + 1u] = 0.0;
        }
        return;
    }
    var local_kl = 0.0;
    for (var j = lid.x; j < p.vocab; j += 256u) {
        let lp = log_probs[base_lp + j];
        let prob = exp(lp);
        if (prob > 0.0) {
            local_kl += prob * (lp - kl_init[base_init + j]);
        }
    }
    let kl = workgroup_sum(local_kl, lid.x);
    for (var j = lid.x; j < p.vocab; j += 256u) {
        let lp = log_probs[base_lp + j];
        let prob = exp(lp);
        var g = 0.0;
        if (prob > 0.0) {
            g = p.kl_factor * prob * (lp - kl_init[base_init + j] - kl);
        }
        d_logits[base_lp + j] = g;
    }
    if (lid.x == 0u) {
        row_loss[2u * r] = p.kl_factor * kl;
        row_loss[2u * r + 1u] = 0.0;
    }
}

var<workgroup> shared_word: u32;

// `v` of invocation 0, known to the whole workgroup as a uniform value.
fn uniform_u32(v: u32, lane: u32) -> u32 {
    if (lane == 0u) {
        shared_word = v;
    }
    return workgroupUniformLoad(&shared_word);
}

// One workgroup per request: its loss at this step (recorded), then unless
// it stops here, the gradient of the loss w.r.t. δ (the sum over its subject
// rows plus weight decay), an Adam step (PyTorch's defaults) and the clamp
// ‖δ‖ ≤ clamp·‖target_init‖.
@compute @workgroup_size(256)
fn step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>{{SUBGROUP_PARAMS}}) {
    {{SUBGROUP_INIT}}
    let j = flat_group(wid, nwg);
    if (j >= p.n) {
        return;
    }
    let lane = lid.x;
    if (uniform_u32(u32(record[j] != 0.0), lane) != 0u) {
        return;
    }
    let delta_base = j * 3u * p.d;
    var local_delta = 0.0;
    var local_init = 0.0;
    for (var c = lane; c < p.d; c += 256u) {
        let x = state[delta_base + c];
        let t = target_init[j * p.d + c];
        local_delta += x * x;
        local_init += t * t;
    }
    let delta_norm = sqrt(workgroup_sum(local_delta, lane));
    let init_sq = max(workgroup_sum(local_init, lane), 1e-12);

    let lo = plan[p.ranges_off + 4u * j];
    let hi = plan[p.ranges_off + 4u * j + 1u];
    var stops = false;
    if (lane == 0u) {
        var nll = 0.0;
        var kl = 0.0;
        var prob = 0.0;
        for (var r = lo; r < hi; r++) {
            if (plan[p.meta_off + 3u * r + 1u] == KL_ROW) {
                kl += row_loss_in[2u * r];
            } else {
                nll += row_loss_in[2u * r];
                prob += row_loss_in[2u * r + 1u];
            }
        }
        let wd = p.weight_decay * delta_norm / init_sq;
        let at = p.n + (p.step * p.n + j) * 4u;
        record[at] = nll;
        record[at + 1u] = kl;
        record[at + 2u] = wd;
        record[at + 3u] = prob;
        stops = nll + kl + wd < p.threshold || p.last_step != 0u;
        if (stops) {
            record[j] = f32(p.step + 1u);
        }
    }
    if (uniform_u32(u32(stops), lane) != 0u) {
        return;
    }

    let look_lo = plan[p.ranges_off + 4u * j + 2u];
    let look_hi = plan[p.ranges_off + 4u * j + 3u];
    var local_new = 0.0;
    for (var c = lane; c < p.d; c += 256u) {
        var g = 0.0;
        for (var k = look_lo; k < look_hi; k++) {
            g += d_hidden[plan[p.lookups_off + k] * p.d + c];
        }
        let x = state[delta_base + c];
        if (delta_norm > 0.0) {
            g += p.weight_decay * x / (delta_norm * init_sq);
        }
        let m = (1.0 - p.one_minus_beta1) * state[delta_base + p.d + c] + p.one_minus_beta1 * g;
        let v = (1.0 - p.one_minus_beta2) * state[delta_base + 2u * p.d + c] + p.one_minus_beta2 * g * g;
        state[delta_base + p.d + c] = m;
        state[delta_base + 2u * p.d + c] = v;
        let updated = x - p.lr * (m / p.bias1) / (sqrt(v / p.bias2) + 1e-8);
        state[delta_base + c] = updated;
        local_new += updated * updated;
    }
    let new_norm = sqrt(workgroup_sum(local_new, lane));
    let max_norm = p.clamp * sqrt(init_sq);
    if (new_norm > max_norm) {
        let scale = max_norm / new_norm;
        for (var c = lane; c < p.d; c += 256u) {
            state[delta_base + c] *= scale;
        }
    }
}
