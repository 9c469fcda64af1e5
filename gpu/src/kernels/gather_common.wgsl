// Shared by the gathers (gather_f32, gather_q8): `locate` finds an output element in the table.
// p: [count, ids, inner, rows, row_start, row_count, scale_stride, scale_dim]; the table is the
// block of rows [row_start, row_start + row_count) along the gathered axis (tables larger than
// a storage binding are split in such blocks, one dispatch each; a block writes only the ids
// that fall in it). Negative ids count from the end, as in ONNX; the host checked the range.
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> y: array<act>;

fn locate(i: u32) -> vec2<u32> {
    let inner = p[2];
    let n_ids = p[1];
    let rows = p[3];
    let t = i / inner;
    var id = ids[t % n_ids];
    if (id < 0) { id += i32(rows); }
    let row = u32(id);
    if (row < p[4] || row >= p[4] + p[5]) { return vec2<u32>(0u, 0u); }
    let outer = t / n_ids;
    // (local element in the block, element in the whole table) + 1, so 0 means elsewhere.
    let local = (outer * p[5] + (row - p[4])) * inner + i % inner;
    let full = (outer * rows + row) * inner + i % inner;
    return vec2<u32>(local + 1u, full);
}
