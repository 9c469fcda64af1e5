// A transpose (any strided read). p: [count, rank, out_shape[6], in_strides[6]].
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    var rest = i;
    var at = 0u;
    let rank = p[1];
    for (var d = 0u; d < rank; d++) {
        let axis = rank - 1u - d;
        at += (rest % p[2u + axis]) * p[8u + axis];
        rest = rest / p[2u + axis];
    }
    y[i] = x[at];
}
