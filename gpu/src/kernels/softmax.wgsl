// Softmax along one axis. p: [outer * inner, len, inner]; one thread per (outer, inner) row along the axis.
@group(0) @binding(1) var<storage, read> x: array<act>;
@group(0) @binding(2) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let len = p[1];
    let inner = p[2];
    let base = (i / inner) * len * inner + i % inner;
    var m = f32(x[base]);
    for (var k = 1u; k < len; k++) { m = max(m, f32(x[base + k * inner])); }
    var s = 0.0;
    for (var k = 0u; k < len; k++) { s += exp(f32(x[base + k * inner]) - m); }
    for (var k = 0u; k < len; k++) { y[base + k * inner] = to_act(exp(f32(x[base + k * inner]) - m) / s); }
}
