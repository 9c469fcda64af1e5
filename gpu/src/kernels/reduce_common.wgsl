// Shared by reduce and reduce_rows: what each element adds, and the last touch on the total.
fn fold(mode: u32, v: f32) -> f32 {
    return select(v, v * v, mode == 4u || mode == 6u);
}

fn finish(mode: u32, s: f32, len: u32) -> f32 {
    if (mode == 1u) { return s / f32(len); }
    if (mode == 6u) { return sqrt(s); }
    return s;
}
