// Gathers rows of an int8 table (with gather_common.wgsl), dequantised.
// The int8 table is packed four to a `u32`, little end first; one scale per channel along the
// quantisation axis (`(full / scale_stride) % scale_dim`).
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read> scale: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let at = locate(i);
    if (at.x == 0u) { return; }
    let e = at.x - 1u;
    let q = extractBits(bitcast<i32>(table[e / 4u]), (e % 4u) * 8u, 8u);
    y[i] = to_act(f32(q) * scale[(at.y / p[6]) % p[7]]);
}
