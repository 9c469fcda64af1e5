// LayerNormalization over the last `len` elements of each row, one workgroup a row: the mean,
// then the variance of the centred values (two passes, as exact as f32 allows), then
// (x - mean) / sqrt(variance + epsilon) * scale + bias. p: [rows, len, epsilon (f32 bits),
// scale_len, bias_len] (a scale or bias of one element broadcasts; bias_len 0: no bias).
@group(0) @binding(1) var<storage, read> x: array<act>;
@group(0) @binding(2) var<storage, read> scale: array<act>;
@group(0) @binding(3) var<storage, read> bias: array<act>;
@group(0) @binding(4) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let row = row_index(wid, nwg);
    let len = select(0u, p[1], row < p[0]);
    let base = row * p[1];
    var s = 0.0;
    for (var j = lid; j < len; j += 64u) { s += f32(x[base + j]); }
    let mean = group_sum(lid, s) / f32(max(p[1], 1u));
    var q = 0.0;
    for (var j = lid; j < len; j += 64u) {
        let c = f32(x[base + j]) - mean;
        q += c * c;
    }
    let variance = group_sum(lid, q) / f32(max(p[1], 1u));
    let inv = 1.0 / sqrt(variance + bitcast<f32>(p[2]));
    for (var j = lid; j < len; j += 64u) {
        var v = (f32(x[base + j]) - mean) * inv * f32(scale[select(0u, j, p[3] > 1u)]);
        if (p[4] > 0u) { v += f32(bias[select(0u, j, p[4] > 1u)]); }
        y[base + j] = to_act(v);
    }
}
