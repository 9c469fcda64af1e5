// Prepended to every kernel: the parameter buffer (binding 0), the thread index, and the
// element-wise functions shared by the unary kernel and the matrix products' activation.

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

// `op` is `UnaryOp::code` (graph.rs); the cases follow its order.
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
        case 10u: { return select(0.0, 1.0, v == 0.0); }
        case 11u: { return select(0.0, 1.0, v != 0.0); }
        case 12u: { return trunc(v); }
        case 13u: { return floor(v); }
        case 14u: { return ceil(v); }
        case 15u: { return 1.0 / v; }
        case 16u: { return log(v); }
        default: { return abs(v); }
    }
}

// A power as ONNX's `Pow` means it: a square is a product, and a negative base takes an integer
// exponent (WGSL's `pow` is undefined for a negative base).
fn power(u: f32, v: f32) -> f32 {
    if (v == 2.0) { return u * u; }
    if (v == 1.0) { return u; }
    if (v == 0.0) { return 1.0; }
    if (v == 0.5) { return sqrt(u); }
    if (u == 0.0) { return select(0.0, 1.0 / u, v < 0.0); }
    if (u < 0.0) {
        if (v != floor(v)) { return sqrt(-1.0 + 0.0 * u); }
        let r = pow(-u, v);
        return select(r, -r, abs(v % 2.0) == 1.0);
    }
    return pow(u, v);
}
