//! The WGSL compute kernels, one pipeline each, compiled once per [`crate::GpuContext`].
//!
//! Every kernel reads its sizes from a small `u32` parameter buffer (binding 0), so one compiled
//! pipeline serves every batch size: a new input shape only writes new parameters. Threads are
//! laid out 64 to a workgroup over a 2-D grid (a 1-D grid stops at 65 535 workgroups); each
//! thread finds its linear index with [`INDEX`] and returns past the end.
//!
//! WGSL has no 64-bit integers (ids arrive as `i32`, converted and range-checked on the host)
//! and no `erf` ([`ERF_MAX_ERROR`]).

/// The kernels, in [`Kernel`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Unary,
    Binary,
    Softmax,
    Reduce,
    GatherF32,
    GatherQ8,
    Concat,
    Strided,
    MatMulF32,
    MatMulQ8,
    QuantizeRows,
    MatMulDot4,
}

impl Kernel {
    pub(crate) const ALL: [Kernel; 12] = [
        Kernel::Unary,
        Kernel::Binary,
        Kernel::Softmax,
        Kernel::Reduce,
        Kernel::GatherF32,
        Kernel::GatherQ8,
        Kernel::Concat,
        Kernel::Strided,
        Kernel::MatMulF32,
        Kernel::MatMulQ8,
        Kernel::QuantizeRows,
        Kernel::MatMulDot4,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kernel::Unary => "unary",
            Kernel::Binary => "binary",
            Kernel::Softmax => "softmax",
            Kernel::Reduce => "reduce",
            Kernel::GatherF32 => "gather_f32",
            Kernel::GatherQ8 => "gather_q8",
            Kernel::Concat => "concat",
            Kernel::Strided => "strided_copy",
            Kernel::MatMulF32 => "matmul_f32",
            Kernel::MatMulQ8 => "matmul_q8",
            Kernel::QuantizeRows => "quantize_rows",
            Kernel::MatMulDot4 => "matmul_dot4",
        }
    }

    /// Whether the kernel needs `dot4I8Packed` (WGSL's packed 4×8-bit integer dot product).
    pub(crate) fn needs_dot4(self) -> bool {
        self == Kernel::MatMulDot4
    }

    pub(crate) fn source(self) -> String {
        let body = match self {
            Kernel::Unary => UNARY,
            Kernel::Binary => BINARY,
            Kernel::Softmax => SOFTMAX,
            Kernel::Reduce => REDUCE,
            Kernel::GatherF32 => GATHER_F32,
            Kernel::GatherQ8 => GATHER_Q8,
            Kernel::Concat => CONCAT,
            Kernel::Strided => STRIDED,
            Kernel::MatMulF32 => MATMUL_F32,
            Kernel::MatMulQ8 => MATMUL_Q8,
            Kernel::QuantizeRows => QUANTIZE_ROWS,
            Kernel::MatMulDot4 => MATMUL_DOT4,
        };
        let four = |name: &str, source: &str| FOUR.replace("NAME", name).replace("SRC", source);
        let body = body
            .replace("GATHER_HEAD", GATHER_HEAD)
            .replace("MATMUL_TAIL", MATMUL_TAIL)
            .replace("FOUR_A", &four("four_a", "a"))
            .replace("FOUR_W", &four("four_w", "w"));
        format!("{COMMON}\n{body}")
    }
}

/// Threads per workgroup, for every kernel.
pub(crate) const WORKGROUP: u32 = 64;

/// The largest absolute error of the shaders' `erf` (and so `Gelu`), which WGSL lacks: the
/// Abramowitz & Stegun 7.1.26 approximation is within 1.5e-7 in exact arithmetic; f32
/// evaluation adds the rest, and WGSL lets `exp` be off by 3 ulp or more (4.8e-7 in all was
/// measured on lavapipe). The tests check it against an f64 reference over [-6, 6].
pub const ERF_MAX_ERROR: f32 = 1e-6;

/// Element-wise functions, by the code [`crate::import`] gives them; also the activation fused
/// into a matrix product.
pub(crate) mod unary {
    pub(crate) const NONE: u32 = 0;
    pub(crate) const RELU: u32 = 1;
    pub(crate) const SIGMOID: u32 = 2;
    pub(crate) const TANH: u32 = 3;
    pub(crate) const ERF: u32 = 4;
    pub(crate) const GELU: u32 = 5;
    pub(crate) const GELU_TANH: u32 = 6;
    pub(crate) const NEG: u32 = 7;
    pub(crate) const EXP: u32 = 8;
    pub(crate) const SQRT: u32 = 9;
    pub(crate) const ABS: u32 = 10;
}

/// Element-wise binary operations, by code.
pub(crate) mod binary {
    pub(crate) const ADD: u32 = 0;
    pub(crate) const SUB: u32 = 1;
    pub(crate) const MUL: u32 = 2;
    pub(crate) const DIV: u32 = 3;
}

/// The most dimensions a broadcast or a transpose handles.
pub(crate) const MAX_RANK: usize = 6;

const COMMON: &str = r"
@group(0) @binding(0) var<storage, read> p: array<u32>;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 64u + lid;
}

// Four int8 (two's complement, low byte first) from one word, without the packed-dot extension.
fn unpack_i8(word: u32) -> vec4<f32> {
    let s = bitcast<i32>(word);
    return vec4<f32>(f32(extractBits(s, 0u, 8u)), f32(extractBits(s, 8u, 8u)),
                     f32(extractBits(s, 16u, 8u)), f32(extractBits(s, 24u, 8u)));
}

// Abramowitz & Stegun 7.1.26: |error| <= 1.5e-7.
fn erf_approx(v: f32) -> f32 {
    let a = abs(v);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
        + t * (-1.453152027 + t * 1.061405429))));
    return sign(v) * (1.0 - poly * exp(-a * a));
}

fn apply(op: u32, v: f32) -> f32 {
    switch op {
        case 0u: { return v; }
        case 1u: { return max(v, 0.0); }
        case 2u: { return 1.0 / (1.0 + exp(-v)); }
        // tanh of a large argument is NaN on some drivers (exp overflows): clamp first.
        case 3u: { return tanh(clamp(v, -15.0, 15.0)); }
        case 4u: { return erf_approx(v); }
        case 5u: { return 0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752)); }
        case 6u: {
            let inner = 0.7978845608028654 * (v + 0.044715 * v * v * v);
            return 0.5 * v * (1.0 + tanh(clamp(inner, -15.0, 15.0)));
        }
        case 7u: { return -v; }
        case 8u: { return exp(v); }
        case 9u: { return sqrt(v); }
        default: { return abs(v); }
    }
}
";

/// p: [count, op]
const UNARY: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    y[i] = apply(p[1], x[i]);
}
";

/// p: [count, op, rank, shape[6], a_strides[6], b_strides[6]] (a broadcast dimension has
/// stride 0).
const BINARY: &str = r"
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

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
    let u = a[ia];
    let v = b[ib];
    var r: f32;
    switch p[1] {
        case 0u: { r = u + v; }
        case 1u: { r = u - v; }
        case 2u: { r = u * v; }
        default: { r = u / v; }
    }
    y[i] = r;
}
";

/// p: [outer * inner, len, inner]; one thread per (outer, inner) row along the axis.
const SOFTMAX: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let len = p[1];
    let inner = p[2];
    let base = (i / inner) * len * inner + i % inner;
    var m = x[base];
    for (var k = 1u; k < len; k++) { m = max(m, x[base + k * inner]); }
    var s = 0.0;
    for (var k = 0u; k < len; k++) { s += exp(x[base + k * inner] - m); }
    for (var k = 0u; k < len; k++) { y[base + k * inner] = exp(x[base + k * inner] - m) / s; }
}
";

/// p: [outer * inner, len, inner, mean]; sums (or averages) along one axis.
const REDUCE: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let len = p[1];
    let inner = p[2];
    let base = (i / inner) * len * inner + i % inner;
    var s = 0.0;
    for (var k = 0u; k < len; k++) { s += x[base + k * inner]; }
    if (p[3] != 0u) { s = s / f32(len); }
    y[i] = s;
}
";

/// p: [count, ids, inner, rows, row_start, row_count, scale_stride, scale_dim]; the table is the
/// block of rows [row_start, row_start + row_count) along the gathered axis (tables larger than
/// a storage binding are split in such blocks, one dispatch each; a block writes only the ids
/// that fall in it). Negative ids count from the end, as in ONNX; the host checked the range.
const GATHER_HEAD: &str = r"
@group(0) @binding(2) var<storage, read> ids: array<i32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn locate(i: u32) -> vec2<u32> {
    let inner = p[2];
    let n_ids = p[1];
    let rows = p[3];
    let t = i / inner;
    var id = ids[t % n_ids];
    if (id < 0) { id += i32(rows); }
    let row = u32(id);
    if (row < p[4] || row >= p[4] + p[5]) { return vec2<u32>(0u, 0u); }
    let outer = t / n_ids;
    // (local element in the block, element in the whole table) + 1, so 0 means elsewhere.
    let local = (outer * p[5] + (row - p[4])) * inner + i % inner;
    let full = (outer * rows + row) * inner + i % inner;
    return vec2<u32>(local + 1u, full);
}
";

const GATHER_F32: &str = r"
@group(0) @binding(1) var<storage, read> table: array<f32>;
GATHER_HEAD
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let at = locate(i);
    if (at.x == 0u) { return; }
    y[i] = table[at.x - 1u];
}
";

/// The int8 table is packed four to a `u32`, little end first; one scale per channel along the
/// quantisation axis (`(full / scale_stride) % scale_dim`).
const GATHER_Q8: &str = r"
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read> scale: array<f32>;
GATHER_HEAD
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    let at = locate(i);
    if (at.x == 0u) { return; }
    let e = at.x - 1u;
    let q = extractBits(bitcast<i32>(table[e / 4u]), (e % 4u) * 8u, 8u);
    y[i] = f32(q) * scale[(at.y / p[6]) % p[7]];
}
";

/// p: [count, chunk, out_row, offset]: copies [outer, chunk] into [outer, out_row] at `offset`.
const CONCAT: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p[0]) { return; }
    y[(i / p[1]) * p[2] + p[3] + i % p[1]] = x[i];
}
";

/// p: [count, rank, out_shape[6], in_strides[6]]: a transpose (any strided read).
const STRIDED: &str = r"
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
";

/// Shared by the matrix products: p: [M, K, block_n, n0, N, act, has_bias, K4]; output
/// y[m, n0 + n] for n in the block; the weight block is laid out one output channel per row.
/// Each thread computes a 4 × 4 tile (4 rows of A, 4 output channels), so every weight word and
/// every activation read serves four products; rows and channels past the end are clamped for
/// reading and skipped for writing. The tile is unrolled by hand: dynamically indexed local
/// arrays spill to memory on some drivers (lavapipe among them).
const MATMUL_TAIL: &str = r"
fn finish(m: u32, n: u32, acc: f32) {
    var v = acc;
    if (p[6] != 0u) { v += bias[p[3] + n]; }
    y[m * p[4] + p[3] + n] = apply(p[5], v);
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
";

/// Four f32 of row `r` of a row-major [rows, K] array from column 4j, zero past K.
const FOUR: &str = r"
fn NAME(r: u32, j: u32) -> vec4<f32> {
    let k_len = p[1];
    let k = j * 4u;
    let base = r * k_len + k;
    if (k + 4u <= k_len) {
        return vec4<f32>(SRC[base], SRC[base + 1u], SRC[base + 2u], SRC[base + 3u]);
    }
    var v = vec4<f32>(0.0);
    if (k < k_len) { v.x = SRC[base]; }
    if (k + 1u < k_len) { v.y = SRC[base + 1u]; }
    if (k + 2u < k_len) { v.z = SRC[base + 2u]; }
    return v;
}
";

/// f32 weights: w[n * K + k].
const MATMUL_F32: &str = r"
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
MATMUL_TAIL
FOUR_A
FOUR_W
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = tile(linear_index(wid, nwg, lid));
    if (t.x >= p[0]) { return; }
    let r0 = row(t, 0u); let r1 = row(t, 1u); let r2 = row(t, 2u); let r3 = row(t, 3u);
    let c0 = channel(t, 0u); let c1 = channel(t, 1u); let c2 = channel(t, 2u); let c3 = channel(t, 3u);
    var acc0 = vec4<f32>(0.0); var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0); var acc3 = vec4<f32>(0.0);
    for (var j = 0u; j < p[7]; j++) {
        let w0 = four_w(c0, j); let w1 = four_w(c1, j); let w2 = four_w(c2, j); let w3 = four_w(c3, j);
        let a0 = four_a(r0, j); let a1 = four_a(r1, j); let a2 = four_a(r2, j); let a3 = four_a(r3, j);
        acc0 += vec4<f32>(dot(a0, w0), dot(a0, w1), dot(a0, w2), dot(a0, w3));
        acc1 += vec4<f32>(dot(a1, w0), dot(a1, w1), dot(a1, w2), dot(a1, w3));
        acc2 += vec4<f32>(dot(a2, w0), dot(a2, w1), dot(a2, w2), dot(a2, w3));
        acc3 += vec4<f32>(dot(a3, w0), dot(a3, w1), dot(a3, w2), dot(a3, w3));
    }
    store_row(t.x, t.y, acc0);
    store_row(t.x + 1u, t.y, acc1);
    store_row(t.x + 2u, t.y, acc2);
    store_row(t.x + 3u, t.y, acc3);
}
";

/// int8 weights, unpacked: w[n * K4 + k / 4] holds k..k+4 of channel n; one scale per channel.
const MATMUL_Q8: &str = r"
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> scale: array<f32>;
MATMUL_TAIL
FOUR_A
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = tile(linear_index(wid, nwg, lid));
    if (t.x >= p[0]) { return; }
    let k4 = p[7];
    let r0 = row(t, 0u); let r1 = row(t, 1u); let r2 = row(t, 2u); let r3 = row(t, 3u);
    let c0 = channel(t, 0u); let c1 = channel(t, 1u); let c2 = channel(t, 2u); let c3 = channel(t, 3u);
    var acc0 = vec4<f32>(0.0); var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0); var acc3 = vec4<f32>(0.0);
    for (var j = 0u; j < k4; j++) {
        let w0 = unpack_i8(w[c0 * k4 + j]); let w1 = unpack_i8(w[c1 * k4 + j]);
        let w2 = unpack_i8(w[c2 * k4 + j]); let w3 = unpack_i8(w[c3 * k4 + j]);
        let a0 = four_a(r0, j); let a1 = four_a(r1, j); let a2 = four_a(r2, j); let a3 = four_a(r3, j);
        acc0 += vec4<f32>(dot(a0, w0), dot(a0, w1), dot(a0, w2), dot(a0, w3));
        acc1 += vec4<f32>(dot(a1, w0), dot(a1, w1), dot(a1, w2), dot(a1, w3));
        acc2 += vec4<f32>(dot(a2, w0), dot(a2, w1), dot(a2, w2), dot(a2, w3));
        acc3 += vec4<f32>(dot(a3, w0), dot(a3, w1), dot(a3, w2), dot(a3, w3));
    }
    let n0 = p[3];
    let s = vec4<f32>(scale[n0 + c0], scale[n0 + c1], scale[n0 + c2], scale[n0 + c3]);
    store_row(t.x, t.y, acc0 * s);
    store_row(t.x + 1u, t.y, acc1 * s);
    store_row(t.x + 2u, t.y, acc2 * s);
    store_row(t.x + 3u, t.y, acc3 * s);
}
";

/// p: [M, K, K4]: quantises each row of `a` to int8 (symmetric, one scale per row), packed four
/// to a `u32`, for [`MATMUL_DOT4`].
const QUANTIZE_ROWS: &str = r"
@group(0) @binding(1) var<storage, read> a: array<f32>;
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
    for (var k = 0u; k < k_len; k++) { top = max(top, abs(a[m * k_len + k])); }
    var s = top / 127.0;
    var inv = 0.0;
    if (top > 0.0) { inv = 127.0 / top; }
    qs[m] = s;
    for (var j = 0u; j < k4; j++) {
        var v = vec4<i32>(0, 0, 0, 0);
        for (var c = 0u; c < 4u; c++) {
            let k = j * 4u + c;
            if (k < k_len) { v[c] = i32(round(clamp(a[m * k_len + k] * inv, -127.0, 127.0))); }
        }
        q[m * k4 + j] = pack4xI8(v);
    }
}
";

/// int8 × int8 with `dot4I8Packed`: activations quantised per row by [`QUANTIZE_ROWS`]
/// (qa[m * K4 + j], one scale per row in qs).
const MATMUL_DOT4: &str = r"
@group(0) @binding(1) var<storage, read> qa: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> scale: array<f32>;
@group(0) @binding(6) var<storage, read> qs: array<f32>;
MATMUL_TAIL
fn dots(x: u32, w0: u32, w1: u32, w2: u32, w3: u32) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(x, w0), dot4I8Packed(x, w1), dot4I8Packed(x, w2),
                     dot4I8Packed(x, w3));
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = tile(linear_index(wid, nwg, lid));
    if (t.x >= p[0]) { return; }
    let k4 = p[7];
    let r0 = row(t, 0u); let r1 = row(t, 1u); let r2 = row(t, 2u); let r3 = row(t, 3u);
    let c0 = channel(t, 0u); let c1 = channel(t, 1u); let c2 = channel(t, 2u); let c3 = channel(t, 3u);
    var acc0 = vec4<i32>(0); var acc1 = vec4<i32>(0);
    var acc2 = vec4<i32>(0); var acc3 = vec4<i32>(0);
    for (var j = 0u; j < k4; j++) {
        let w0 = w[c0 * k4 + j]; let w1 = w[c1 * k4 + j];
        let w2 = w[c2 * k4 + j]; let w3 = w[c3 * k4 + j];
        acc0 += dots(qa[r0 * k4 + j], w0, w1, w2, w3);
        acc1 += dots(qa[r1 * k4 + j], w0, w1, w2, w3);
        acc2 += dots(qa[r2 * k4 + j], w0, w1, w2, w3);
        acc3 += dots(qa[r3 * k4 + j], w0, w1, w2, w3);
    }
    let n0 = p[3];
    let s = vec4<f32>(scale[n0 + c0], scale[n0 + c1], scale[n0 + c2], scale[n0 + c3]);
    store_row(t.x, t.y, vec4<f32>(acc0) * s * qs[r0]);
    store_row(t.x + 1u, t.y, vec4<f32>(acc1) * s * qs[r1]);
    store_row(t.x + 2u, t.y, vec4<f32>(acc2) * s * qs[r2]);
    store_row(t.x + 3u, t.y, vec4<f32>(acc3) * s * qs[r3]);
}
";
