// Embedding gather: out[i, :] = table[ids[ids_off + i], :] for the ids that fall in
// this table chunk (rows row0 .. row0 + rows); other ids are left alone and
// filled by the dispatch for their own chunk. Grid: x over 256-wide column
// blocks, y over ids. `scatter` is the reverse for f32 rows: dest[ids[i], :]
// = src[i, :] for the ids in this destination chunk.

const TABLE_F16: bool = {{TABLE_F16}};

struct Params {
    n_ids: u32, dim: u32, row0: u32, rows: u32,
    table_off: u32, out_off: u32, ids_off: u32, _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn load_table(i: u32) -> f32 {
    if (TABLE_F16) {
        return unpack2x16float(table[i >> 1u])[i & 1u];
    }
    return bitcast<f32>(table[i]);
}

// Where invocation (col, i) reads and writes: element `row_elem` of the
// packed rows and element `table_elem` of this shard of the table, when the
// column is in range and ids[i] falls in the shard.
struct TableSlot {
    row_elem: u32,
    table_elem: u32,
    live: bool,
}

fn table_slot(col: u32, i: u32) -> TableSlot {
    if (col >= p.dim || i >= p.n_ids) {
        return TableSlot(0u, 0u, false);
    }
    let id = ids[p.ids_off + i];
    if (id < p.row0 || id >= p.row0 + p.rows) {
        return TableSlot(0u, 0u, false);
    }
    return TableSlot(i * p.dim + col, (id - p.row0) * p.dim + col, true);
}

@compute @workgroup_size(256)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let slot = table_slot(gid.x, wid.y);
    if (slot.live) {
        out[p.out_off + slot.row_elem] = load_table(p.table_off + slot.table_elem);
    }
}

@group(0) @binding(4) var<storage, read> src: array<f32>;

@compute @workgroup_size(256)
fn scatter(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let slot = table_slot(gid.x, wid.y);
    if (slot.live) {
        out[p.table_off + slot.table_elem] = src[p.out_off + slot.row_elem];
    }
}
