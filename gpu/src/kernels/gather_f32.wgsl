// Gathers rows of an f32 table (with gather_common.wgsl).
@group(0) @binding(1) var<storage, read> table: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let at = locate(i);
    if (at.x == 0u) { return; }
    y[i] = table[at.x - 1u];
}
