// Softmax along the last axis, one workgroup a row (rows of thousands stay fast). p: [rows, len]
@group(0) @binding(1) var<storage, read> x: array<act>;
@group(0) @binding(2) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wid, nwg);
    let len = select(0u, p[1], row < p[0]);
    let base = row * p[1];
    var m = -3.4028235e38;
    for (var j = lid; j < len; j += 64u) { m = max(m, f32(x[base + j])); }
    m = group_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < len; j += 64u) { s += exp(f32(x[base + j]) - m); }
    s = group_sum(lid, s);
    for (var j = lid; j < len; j += 64u) { y[base + j] = to_act(exp(f32(x[base + j]) - m) / s); }
}
