// int8 × int8 with `dot4I8Packed` (with matmul_common.wgsl): activations quantised per row
// by quantize_rows.wgsl (qa[m * K4 + j], one scale per row in qs).
@group(0) @binding(1) var<storage, read> qa: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<act>;
@group(0) @binding(5) var<storage, read> scale: array<f32>;
@group(0) @binding(6) var<storage, read> qs: array<f32>;
fn dots(x: u32, w0: u32, w1: u32, w2: u32, w3: u32) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(x, w0), dot4I8Packed(x, w1), dot4I8Packed(x, w2),
                     dot4I8Packed(x, w3));
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = tile(linear_index(wid, nwg, lid));
    if (t.x >= p[0]) { return; }
    let k4 = p[7];
    let r0 = row(t, 0u); let r1 = row(t, 1u); let r2 = row(t, 2u); let r3 = row(t, 3u);
    let c0 = channel(t, 0u); let c1 = channel(t, 1u); let c2 = channel(t, 2u); let c3 = channel(t, 3u);
    var acc0 = vec4<i32>(0); var acc1 = vec4<i32>(0);
    var acc2 = vec4<i32>(0); var acc3 = vec4<i32>(0);
    for (var j = 0u; j < k4; j++) {
        let w0 = w[c0 * k4 + j]; let w1 = w[c1 * k4 + j];
        let w2 = w[c2 * k4 + j]; let w3 = w[c3 * k4 + j];
        acc0 += dots(qa[r0 * k4 + j], w0, w1, w2, w3);
        acc1 += dots(qa[r1 * k4 + j], w0, w1, w2, w3);
        acc2 += dots(qa[r2 * k4 + j], w0, w1, w2, w3);
        acc3 += dots(qa[r3 * k4 + j], w0, w1, w2, w3);
    }
    let n0 = p[3];
    let s = vec4<f32>(scale[n0 + c0], scale[n0 + c1], scale[n0 + c2], scale[n0 + c3]);
    store_row(t.x, t.y, vec4<f32>(acc0) * s * qs[r0]);
    store_row(t.x + 1u, t.y, vec4<f32>(acc1) * s * qs[r1]);
    store_row(t.x + 2u, t.y, vec4<f32>(acc2) * s * qs[r2]);
    store_row(t.x + 3u, t.y, vec4<f32>(acc3) * s * qs[r3]);
}
