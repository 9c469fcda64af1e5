// p: [M, K, K4]: quantises each row of `a` to int8 (symmetric, one scale per row), packed four
// to a `u32`, for matmul_dot4.wgsl.
@group(0) @binding(1) var<storage, read> a: array<act>;
@group(0) @binding(2) var<storage, read_write> q: array<u32>;
@group(0) @binding(3) var<storage, read_write> qs: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let m = linear_index(wid, nwg, lid);
    if (m >= p[0]) { return; }
    let k_len = p[1];
    let k4 = p[2];
    var top = 0.0;
    for (var k = 0u; k < k_len; k++) { top = max(top, abs(f32(a[m * k_len + k]))); }
    var s = top / 127.0;
    var inv = 0.0;
    if (top > 0.0) { inv = 127.0 / top; }
    qs[m] = s;
    for (var j = 0u; j < k4; j++) {
        var v = vec4<i32>(0, 0, 0, 0);
        for (var c = 0u; c < 4u; c++) {
            let k = j * 4u + c;
            if (k < k_len) { v[c] = i32(round(clamp(f32(a[m * k_len + k]) * inv, -127.0, 127.0))); }
        }
        q[m * k4 + j] = pack4xI8(v);
    }
}
