// A matrix product of two computed operands, batched: y[batch, m, n] = sum_k a[batch, m, k] *
// b[batch, k, n], with the batch dimensions broadcast. One thread per output element.
// p: [count, m, k, n, batch_rank, batch[4], a_batch_strides[4], b_batch_strides[4]]; the strides
// count whole matrices (M·K of a, K·N of b), 0 along a broadcast dimension.
@group(0) @binding(1) var<storage, read> a: array<act>;
@group(0) @binding(2) var<storage, read> b: array<act>;
@group(0) @binding(3) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let m = p[1];
    let k = p[2];
    let n = p[3];
    let col = i % n;
    let row = (i / n) % m;
    var rest = i / (m * n);
    var ma = 0u;
    var mb = 0u;
    let rank = p[4];
    for (var d = 0u; d < rank; d++) {
        let axis = rank - 1u - d;
        let c = rest % p[5u + axis];
        rest = rest / p[5u + axis];
        ma += c * p[9u + axis];
        mb += c * p[13u + axis];
    }
    let base_a = ma * m * k + row * k;
    let base_b = mb * k * n + col;
    var s = 0.0;
    for (var j = 0u; j < k; j++) {
        s += f32(a[base_a + j]) * f32(b[base_b + j * n]);
    }
    y[i] = to_act(s);
}
