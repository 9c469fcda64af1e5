// Where(condition, a, b), broadcasting. p: [count, rank, shape[6], cond_strides[6], a_strides[6],
// b_strides[6]] (a broadcast dimension has stride 0); the condition is a float, 0 is false.
@group(0) @binding(1) var<storage, read> c: array<act>;
@group(0) @binding(2) var<storage, read> a: array<act>;
@group(0) @binding(3) var<storage, read> b: array<act>;
@group(0) @binding(4) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    var rest = i;
    var ic = 0u;
    var ia = 0u;
    var ib = 0u;
    let rank = p[1];
    for (var d = 0u; d < rank; d++) {
        let axis = rank - 1u - d;
        let k = rest % p[2u + axis];
        rest = rest / p[2u + axis];
        ic += k * p[8u + axis];
        ia += k * p[14u + axis];
        ib += k * p[20u + axis];
    }
    y[i] = select(b[ib], a[ia], f32(c[ic]) != 0.0);
}
