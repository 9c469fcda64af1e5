// A matrix product with f32 weights (with matmul_common.wgsl): w[n * K + k].
@group(0) @binding(1) var<storage, read> a: array<act>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<act>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = tile(linear_index(wid, nwg, lid));
    if (t.x >= p[0]) { return; }
    let r0 = row(t, 0u); let r1 = row(t, 1u); let r2 = row(t, 2u); let r3 = row(t, 3u);
    let c0 = channel(t, 0u); let c1 = channel(t, 1u); let c2 = channel(t, 2u); let c3 = channel(t, 3u);
    var acc0 = vec4<f32>(0.0); var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0); var acc3 = vec4<f32>(0.0);
    for (var j = 0u; j < p[7]; j++) {
        let w0 = four_w(c0, j); let w1 = four_w(c1, j); let w2 = four_w(c2, j); let w3 = four_w(c3, j);
        let a0 = four_a(r0, j); let a1 = four_a(r1, j); let a2 = four_a(r2, j); let a3 = four_a(r3, j);
        acc0 += vec4<f32>(dot(a0, w0), dot(a0, w1), dot(a0, w2), dot(a0, w3));
        acc1 += vec4<f32>(dot(a1, w0), dot(a1, w1), dot(a1, w2), dot(a1, w3));
        acc2 += vec4<f32>(dot(a2, w0), dot(a2, w1), dot(a2, w2), dot(a2, w3));
        acc3 += vec4<f32>(dot(a3, w0), dot(a3, w1), dot(a3, w2), dot(a3, w3));
    }
    store_row(t.x, t.y, acc0);
    store_row(t.x + 1u, t.y, acc1);
    store_row(t.x + 2u, t.y, acc2);
    store_row(t.x + 3u, t.y, acc3);
}
