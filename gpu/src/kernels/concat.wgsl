// One input of a Concat. p: [count, chunk, out_row, offset]: copies [outer, chunk] into [outer, out_row] at `offset`.
@group(0) @binding(1) var<storage, read> x: array<act>;
@group(0) @binding(2) var<storage, read_write> y: array<act>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    y[(i / p[1]) * p[2] + p[3] + i % p[1]] = x[i];
}
