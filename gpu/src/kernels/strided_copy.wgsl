// A strided read, copied element for element: transposes, slices, split parts, broadcasts
// (`Expand`). A template: ELEM is `u32` for ids (`strided_copy`) and `act` for activations
// (`strided_copy_act`), so an element is 4 bytes, or 2 with f16 activations. p: [count, rank, out_shape[6], in_strides[6], offset]; strides and the
// offset are i32 (a reversed slice walks backwards; a broadcast dimension has stride 0).
@group(0) @binding(1) var<storage, read> x: array<ELEM>;
@group(0) @binding(2) var<storage, read_write> y: array<ELEM>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    var rest = i;
    var at = bitcast<i32>(p[14]);
    let rank = p[1];
    for (var d = 0u; d < rank; d++) {
        let axis = rank - 1u - d;
        at += i32(rest % p[2u + axis]) * bitcast<i32>(p[8u + axis]);
        rest = rest / p[2u + axis];
    }
    y[i] = x[u32(at)];
}
