//! WGSL sources (one file per kernel family under `shaders/`) and the small
//! template step that specialises them: every `{{KEY}}` in a source is replaced
//! by a value chosen at pipeline-creation time (tile sizes, transposes, storage
//! dtypes, the op of an elementwise kernel). Constant branches such as
//! `if (TRANS_A) {..}` are folded by the shader compiler.

use crate::error::{GpuError, Result};

/// The kernel families; each maps to one file in `shaders/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShaderFamily {
    Matmul,
    /// Tensor-core products (`enable wgpu_cooperative_matrix`): a module of
    /// their own, since other adapters cannot parse it.
    MatmulCoop,
    Elementwise,
    Activation,
    Reduce,
    Softmax,
    Norm,
    Embedding,
    Attention,
    Solve,
    Target,
}

impl ShaderFamily {
    pub fn name(self) -> &'static str {
        match self {
            ShaderFamily::Matmul => "matmul",
            ShaderFamily::MatmulCoop => "matmul_coop",
            ShaderFamily::Elementwise => "elementwise",
            ShaderFamily::Activation => "activation",
            ShaderFamily::Reduce => "reduce",
            ShaderFamily::Softmax => "softmax",
            ShaderFamily::Norm => "norm",
            ShaderFamily::Embedding => "embedding",
            ShaderFamily::Attention => "attention",
            ShaderFamily::Solve => "solve",
            ShaderFamily::Target => "target",
        }
    }

    /// Families compiled without runtime checks (no injected bounds clamps,
    /// no loop-bounding counters), which keep compilers from vectorising
    /// row loops: on lavapipe norms run 15x and attention 4x faster so.
    /// Each of their buffer indices is bounded by shapes and offsets the
    /// host validates before the dispatch (rows clamped, loops bounded by
    /// parameters), and every loop ends.
    /// `matmul_big` (a module made for it runs nothing else) loads through
    /// `a_at`/`b_at`, which read zero outside the matrix, and stores only
    /// inside it. The tensor-core kernels run only on shapes of whole tiles
    /// and fragments inside their tensors' chunks (`coop_grid`), the staged
    /// one's words past K read as zero, and its slab indices stay within
    /// the slabs by construction (its subgroup index clamped to the four
    /// it has): unchecked, NVIDIA's compiler sees the slab stores and
    /// fragment loads without a clamp each (80 per slab and invocation).
    pub fn audited(self, entry: &str) -> bool {
        matches!(self, ShaderFamily::Norm | ShaderFamily::Attention | ShaderFamily::Softmax | ShaderFamily::Target | ShaderFamily::MatmulCoop)
            || (self == ShaderFamily::Matmul && entry == "matmul_big")
    }

    pub fn source(self) -> &'static str {
        match self {
            ShaderFamily::Matmul => include_str!("../../../shaders/matmul.wgsl"),
            ShaderFamily::MatmulCoop => include_str!("../../../shaders/matmul_coop.wgsl"),
            ShaderFamily::Elementwise => include_str!("../../../shaders/elementwise.wgsl"),
            ShaderFamily::Activation => include_str!("../../../shaders/activation.wgsl"),
            ShaderFamily::Reduce => include_str!("../../../shaders/reduce.wgsl"),
            ShaderFamily::Softmax => include_str!("../../../shaders/softmax.wgsl"),
            ShaderFamily::Norm => include_str!("../../../shaders/norm.wgsl"),
            ShaderFamily::Embedding => include_str!("../../../shaders/embedding.wgsl"),
            ShaderFamily::Attention => include_str!("../../../shaders/attention.wgsl"),
            ShaderFamily::Solve => include_str!("../../../shaders/solve.wgsl"),
            ShaderFamily::Target => include_str!("../../../shaders/target.wgsl"),
        }
    }
}

/// Helpers pasted where a family writes `{{COMMON}}`, with the workgroup
/// reductions of the device (`SUBGROUPS` set: through subgroups).
const COMMON: &str = include_str!("../../../shaders/common.wgsl");
const REDUCE_TREE: &str = include_str!("../../../shaders/reduce_tree.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../../shaders/reduce_subgroup.wgsl");
/// An entry point's subgroup builtins (`{{SUBGROUP_PARAMS}}`) and where the
/// reductions find them (`{{SUBGROUP_INIT}}`), with subgroups.
const SUBGROUP_PARAMS: &str = ", @builtin(subgroup_id) subgroup_id_in: u32, @builtin(num_subgroups) num_subgroups_in: u32, \
     @builtin(subgroup_invocation_id) subgroup_lane_in: u32, @builtin(subgroup_size) subgroup_size_in: u32";
const SUBGROUP_INIT: &str = "subgroup_slot = subgroup_id_in;
    subgroup_count = num_subgroups_in;
    subgroup_lane = subgroup_lane_in;
    subgroup_width = subgroup_size_in;";
/// The matrix products' parameters, pasted where `matmul` and
/// `matmul_coop` write `{{MATMUL_PARAMS}}`.
const MATMUL_PARAMS: &str = include_str!("../../../shaders/matmul_params.wgsl");
/// The activation functions, pasted where a family writes `{{ACTIVATIONS}}`.
pub(crate) const ACTIVATIONS: &str = include_str!("../../../shaders/activations.wgsl");

/// Replaces every `{{KEY}}` in `source` with its value (`COMMON`,
/// `ACTIVATIONS` and `MATMUL_PARAMS` are always available, as are
/// `SUBGROUP_PARAMS` and `SUBGROUP_INIT`, empty unless `SUBGROUPS` is
/// `true`, and so are
/// `WIDE_BLOCK`, `BIG_BLOCK`, `COOP_BLOCK` and `COOP_STAGED_BLOCK`: the
/// unrolled block of `matmul_wide`, `matmul_big`, `matmul_coop` and
/// `matmul_coop_staged` where `entry` is that kernel, else nothing, since
/// a module made for another entry point never runs it); a key left
/// without a value is an error rather than a confusing WGSL parse failure
/// later.
pub fn render(family: ShaderFamily, entry: &str, defines: &[(&'static str, String)]) -> Result<String> {
    let source = family.source();
    let subgroups = defined_true(defines, "SUBGROUPS");
    let common = COMMON.replace("{{WORKGROUP_REDUCTIONS}}", if subgroups { REDUCE_SUBGROUP } else { REDUCE_TREE });
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| GpuError::Template {
            shader: family.name(),
            key: "<unterminated {{>".into(),
        })?;
        let key = &after[..end];
        let value = defines
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
            .or((key == "COMMON").then_some(common.as_str()))
            .or((key == "SUBGROUP_PARAMS").then_some(if subgroups { SUBGROUP_PARAMS } else { "" }))
            .or((key == "SUBGROUP_INIT").then_some(if subgroups { SUBGROUP_INIT } else { "" }))
            .or((key == "ACTIVATIONS").then_some(ACTIVATIONS))
            .or((key == "MATMUL_PARAMS").then_some(MATMUL_PARAMS))
            .or_else(|| (key == "WIDE_BLOCK").then(|| if entry == "matmul_wide" { crate::ops::matmul::wide_block(defines) } else { "" }))
            .or_else(|| (key == "BIG_BLOCK").then(|| if entry == "matmul_big" { crate::ops::matmul::big_block() } else { "" }))
            .or_else(|| (key == "COOP_BLOCK").then(|| crate::ops::matmul::coop_block(entry, defines)).flatten())
            .or_else(|| (key == "COOP_STAGED_BLOCK").then(|| crate::ops::matmul::coop_staged_block(entry, defines)).flatten())
            .ok_or_else(|| GpuError::Template { shader: family.name(), key: key.to_string() })?;
        out.push_str(value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `defines` sets `key` to `true` (as [`flag`] spells it).
pub(crate) fn defined_true(defines: &[(&'static str, String)], key: &str) -> bool {
    defines.iter().any(|(k, v)| *k == key && v == "true")
}

/// WGSL spelling of a boolean template value.
pub fn flag(b: bool) -> String {
    if b { "true".into() } else { "false".into() }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    /// The tensor-core module runs only where an adapter has cooperative
    /// matrices (not on the system lavapipe of CI's Debian; tests/run.sh
    /// runs them on a newer one); naga checks here, on every machine, that
    /// both kernels, in both layouts of B and at NVIDIA's, Apple's and
    /// lavapipe's sizes, parse, validate and translate to SPIR-V 1.6 (Vulkan)
    /// and to MSL 2.4 (Metal) as wgpu would. wgpu reports Metal's simdgroup
    /// matrices (8×8×8 f16 into f32) but a range of subgroup sizes (4–64),
    /// so Apple GPUs keep the portable kernels for now; the MSL check keeps
    /// the module ready for a Metal that reports its one width (32).
    #[test]
    fn coop_module_translates_to_spirv_and_msl() {
        for (entry, trans_b, (fragment, subgroup)) in coop_cases() {
            let (module, info) = coop_module(entry, trans_b, (fragment, subgroup));
            let options = naga::back::spv::Options { lang_version: (1, 6), ..Default::default() };
            let words = naga::back::spv::write_vec(&module, &info, &options, None).expect("SPIR-V");
            assert!(words.len() > 100, "{entry} trans_b={trans_b} fragment {fragment}");
            let msl = naga::back::msl::Options { lang_version: (2, 4), ..Default::default() };
            let (metal, _) = naga::back::msl::write_string(&module, &info, &msl, &Default::default())
                .unwrap_or_else(|e| panic!("{entry} trans_b={trans_b} fragment {fragment} subgroup {subgroup} to MSL: {e}"));
            assert!(metal.contains("simdgroup"), "{entry}: no simdgroup matrices in its MSL");
        }
    }

    /// The tensor-core module for `entry`, the layout of B and the
    /// (fragment, subgroup) sizes, parsed and validated by naga.
    fn coop_module(entry: &str, trans_b: bool, (fragment, subgroup): (usize, usize)) -> (naga::Module, naga::valid::ModuleInfo) {
        let mut defines = vec![("TRANS_B", flag(trans_b))];
        defines.extend(crate::ops::matmul::CoopSizes::new(fragment, subgroup).defines());
        let source = render(ShaderFamily::MatmulCoop, entry, &defines).unwrap();
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| panic!("{}", e.emit_to_string(&source)));
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&source)));
        (module, info)
    }

    fn coop_cases() -> Vec<(&'static str, bool, (usize, usize))> {
        let mut cases = Vec::new();
        for entry in ["matmul_coop", "matmul_coop_staged"] {
            for trans_b in [false, true] {
                // NVIDIA's, Apple's and lavapipe's (fragment, subgroup).
                for sizes in [(16, 32), (8, 32), (8, 8)] {
                    cases.push((entry, trans_b, sizes));
                }
            }
        }
        cases
    }

    /// What NVIDIA's driver gets for `matmul_coop_staged` at its sizes
    /// (16×16×16 fragments, 32-wide subgroups): SPIR-V as wgpu writes it
    /// for an audited module (no runtime checks), whose k loop moves each
    /// 16-byte word of A and B into the slabs as it is: no conversion (a
    /// `vec4<u32>` view took 32 unpacks to f32 and 32 conversions back per
    /// slab and invocation) and no index clamp (80 with checks; the one
    /// `UMin` left is the subgroup index's, once before the loop). Prints
    /// the instruction counts with and without wgpu's checks
    /// (`--nocapture`).
    #[test]
    fn staged_tensor_core_kernel_moves_halves_without_conversions_or_clamps() {
        use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
        assert!(ShaderFamily::MatmulCoop.audited("matmul_coop_staged"));
        for trans_b in [false, true] {
            let (module, info) = coop_module("matmul_coop_staged", trans_b, (16, 32));
            let mut counts = Vec::new();
            for checked in [true, false] {
                // wgpu's Vulkan options on NVIDIA (robust buffer access 2:
                // storage buffers unchecked), with and without its checks.
                let index = if checked { BoundsCheckPolicy::Restrict } else { BoundsCheckPolicy::Unchecked };
                let options = naga::back::spv::Options {
                    lang_version: (1, 6),
                    bounds_check_policies: BoundsCheckPolicies { index, buffer: BoundsCheckPolicy::Unchecked, image_load: index, binding_array: BoundsCheckPolicy::Unchecked },
                    force_loop_bounding: checked,
                    ..Default::default()
                };
                let words = naga::back::spv::write_vec(&module, &info, &options, None).expect("SPIR-V");
                // All instructions; GLSL.std.450's UMin (an index clamp) and
                // UnpackHalf2x16 (OpExtInst, opcode 12, its instruction in
                // word 4); OpFConvert (115).
                let (mut total, mut clamps, mut unpacks, mut converts) = (0, 0, 0, 0);
                let mut at = 5;
                while at < words.len() {
                    let (op, len) = (words[at] & 0xffff, (words[at] >> 16) as usize);
                    total += 1;
                    clamps += usize::from(op == 12 && words[at + 4] == 38);
                    unpacks += usize::from(op == 12 && words[at + 4] == 62);
                    converts += usize::from(op == 115);
                    at += len.max(1);
                }
                eprintln!("matmul_coop_staged trans_b={trans_b} runtime checks {checked}: {total} SPIR-V instructions, {clamps} UMin, {unpacks} UnpackHalf2x16, {converts} OpFConvert");
                counts.push((clamps, unpacks, converts));
            }
            assert_eq!(counts[1], (1, 0, 0), "trans_b={trans_b}: the audited kernel clamps or converts (UMin, UnpackHalf2x16, OpFConvert)");
        }
    }
}
