// p: [outer * inner, len, inner, mean]: sums (or averages) along one axis.
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let len = p[1];
    let inner = p[2];
    let base = (i / inner) * len * inner + i % inner;
    var s = 0.0;
    for (var k = 0u; k < len; k++) { s += x[base + k * inner]; }
    if (p[3] != 0u) { s = s / f32(len); }
    y[i] = s;
}
