// A reduction along the last axis, one workgroup a row. p: [rows, len, mode] (modes as in
// reduce.wgsl).
@group(0) @binding(1) var<storage, read> x: array<act>;
@group(0) @binding(2) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wid, nwg);
    let len = select(0u, p[1], row < p[0]);
    let base = row * p[1];
    let mode = p[2];
    var r: f32;
    if (mode == 2u || mode == 3u) {
        var m = 0.0;
        if (len > 0u) { m = f32(x[base]); }
        for (var j = lid; j < len; j += 64u) {
            let v = f32(x[base + j]);
            m = select(min(m, v), max(m, v), mode == 2u);
        }
        // Threads past the row's end hold its first element, which changes neither.
        if (mode == 2u) { r = group_max(lid, m); } else { r = -group_max(lid, -m); }
    } else {
        var s = 0.0;
        for (var j = lid; j < len; j += 64u) { s += fold(mode, f32(x[base + j])); }
        r = group_sum(lid, s);
    }
    if (lid == 0u && row < p[0]) { y[row] = to_act(finish(mode, r, p[1])); }
}
