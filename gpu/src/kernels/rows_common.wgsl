// Shared by the kernels that give one workgroup a row (softmax_rows, reduce_rows, layer_norm):
// the row this workgroup takes, and a sum or maximum of one value per thread over the group.
// Barriers sit outside every branch (a workgroup past the last row computes and writes nothing).
var<workgroup> part: array<f32, 64>;

fn row_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

fn group_sum(lid: u32, v: f32) -> f32 {
    part[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) { part[lid] = part[lid] + part[lid + s]; }
        workgroupBarrier();
    }
    let r = part[0];
    workgroupBarrier();
    return r;
}

fn group_max(lid: u32, v: f32) -> f32 {
    part[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) { part[lid] = max(part[lid], part[lid + s]); }
        workgroupBarrier();
    }
    let r = part[0];
    workgroupBarrier();
    return r;
}
