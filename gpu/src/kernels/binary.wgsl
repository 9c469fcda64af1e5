// An element-wise binary operation, broadcasting. p: [count, op, rank, shape[6], a_strides[6], b_strides[6]] (a broadcast dimension has
// stride 0).
@group(0) @binding(1) var<storage, read> a: array<act>;
@group(0) @binding(2) var<storage, read> b: array<act>;
@group(0) @binding(3) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    var rest = i;
    var ia = 0u;
    var ib = 0u;
    let rank = p[2];
    for (var d = 0u; d < rank; d++) {
        let axis = rank - 1u - d;
        let c = rest % p[3u + axis];
        rest = rest / p[3u + axis];
        ia += c * p[9u + axis];
        ib += c * p[15u + axis];
    }
    let u = f32(a[ia]);
    let v = f32(b[ib]);
    var r: f32;
    // `BinaryOp::code` (graph.rs).
    switch p[1] {
        case 0u: { r = u + v; }
        case 1u: { r = u - v; }
        case 2u: { r = u * v; }
        case 3u: { r = u / v; }
        case 4u: { r = power(u, v); }
        case 5u: { r = max(u, v); }
        case 6u: { r = min(u, v); }
        // Comparisons and logic: 1 or 0 (booleans are numbers here).
        case 7u: { r = select(0.0, 1.0, u == v); }
        case 8u: { r = select(0.0, 1.0, u < v); }
        case 9u: { r = select(0.0, 1.0, u > v); }
        case 10u: { r = select(0.0, 1.0, u <= v); }
        case 11u: { r = select(0.0, 1.0, u >= v); }
        case 12u: { r = select(0.0, 1.0, u != 0.0 && v != 0.0); }
        case 13u: { r = select(0.0, 1.0, u != 0.0 || v != 0.0); }
        default: { r = select(0.0, 1.0, (u != 0.0) != (v != 0.0)); }
    }
    y[i] = to_act(r);
}
