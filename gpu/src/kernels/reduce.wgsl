// p: [outer * inner, len, inner, mode]: a reduction along one axis, one thread an output. Modes:
// 0 sum, 1 mean, 2 max, 3 min, 4 sum of squares, 6 sum of squares then square root (`ReduceKind`,
// `reduce_mode` in lower.rs: over several runs of axes, a sum of squares squares in its first
// dispatch only, and an L2 norm is the norm of each run's norms).
@group(0) @binding(1) var<storage, read> x: array<act>;
@group(0) @binding(2) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let len = p[1];
    let inner = p[2];
    let mode = p[3];
    let base = (i / inner) * len * inner + i % inner;
    var s: f32;
    if (mode == 2u || mode == 3u) {
        s = f32(x[base]);
        for (var k = 1u; k < len; k++) {
            let v = f32(x[base + k * inner]);
            s = select(min(s, v), max(s, v), mode == 2u);
        }
    } else {
        s = 0.0;
        for (var k = 0u; k < len; k++) { s += fold(mode, f32(x[base + k * inner])); }
    }
    y[i] = to_act(finish(mode, s, len));
}
