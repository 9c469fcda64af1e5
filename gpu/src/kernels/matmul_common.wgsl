// Shared by the matrix products (matmul_f32, matmul_q8, matmul_dot4): p: [M, K, block_n, n0, N, act, has_bias, K4]; output
// y[m, n0 + n] for n in the block; the weight block is laid out one output channel per row.
// Each thread computes a 4 × 4 tile (4 rows of A, 4 output channels), so every weight word and
// every activation read serves four products; rows and channels past the end are clamped for
// reading and skipped for writing. The tile is unrolled by hand: dynamically indexed local
// arrays spill to memory on some drivers (lavapipe among them).
fn finish(m: u32, n: u32, acc: f32) {
    var v = acc;
    if (p[6] != 0u) { v += bias[p[3] + n]; }
    y[m * p[4] + p[3] + n] = to_act(apply(p[5], v));
}

// Writes row m of a tile: channels n..n+4 of the block, those that exist.
fn store_row(m: u32, n: u32, v: vec4<f32>) {
    if (m >= p[0]) { return; }
    let bn = p[2];
    finish(m, n, v.x);
    if (n + 1u < bn) { finish(m, n + 1u, v.y); }
    if (n + 2u < bn) { finish(m, n + 2u, v.z); }
    if (n + 3u < bn) { finish(m, n + 3u, v.w); }
}

// The tile of thread i, or (rows, 0) past the last tile.
fn tile(i: u32) -> vec2<u32> {
    let tiles_n = (p[2] + 3u) / 4u;
    if (i >= ((p[0] + 3u) / 4u) * tiles_n) { return vec2<u32>(p[0], 0u); }
    return vec2<u32>((i / tiles_n) * 4u, (i % tiles_n) * 4u);
}

// Row r of the tile, clamped to the last row.
fn row(t: vec2<u32>, r: u32) -> u32 {
    return min(t.x + r, p[0] - 1u);
}

// Channel c of the tile, clamped to the block's last channel.
fn channel(t: vec2<u32>, c: u32) -> u32 {
    return min(t.y + c, p[2] - 1u);
}
