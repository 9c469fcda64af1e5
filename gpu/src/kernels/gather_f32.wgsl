// Gathers rows of a float table (with gather_common.wgsl): a computed value, or a constant
// table uploaded as activations are held (f32, or f16).
@group(0) @binding(1) var<storage, read> table: array<act>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let at = locate(i);
    if (at.x == 0u) { return; }
    y[i] = table[at.x - 1u];
}
