// Four elements of row `r` of a row-major [rows, K] array from column 4j, zero past K. A template:
// kernels.rs instantiates it once per array read, putting the function's name and the array's
// in place of the two upper-case words.
fn NAME(r: u32, j: u32) -> vec4<f32> {
    let k_len = p[1];
    let k = j * 4u;
    let base = r * k_len + k;
    if (k + 4u <= k_len) {
        return vec4<f32>(f32(SRC[base]), f32(SRC[base + 1u]), f32(SRC[base + 2u]),
                         f32(SRC[base + 3u]));
    }
    var v = vec4<f32>(0.0);
    if (k < k_len) { v.x = f32(SRC[base]); }
    if (k + 1u < k_len) { v.y = f32(SRC[base + 1u]); }
    if (k + 2u < k_len) { v.z = f32(SRC[base + 2u]); }
    return v;
}
