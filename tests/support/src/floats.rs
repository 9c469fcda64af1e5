//! Comparing model outputs computed by two plans or engines. Two tract plans of one model (an
//! optimised per-shape plan and the symbolic one, or the same plan on another CPU) may pick other
//! kernels (AVX-512 or not) and sum in another order, so their floats can differ in the last
//! bits: such results are compared within a stated tolerance, never bit for bit.

/// Relative bound for two tract plans of one model: a few hundred ulps of f32, far below any
/// difference a wrong model or a wrong input would make.
pub const PLAN_RELATIVE_TOLERANCE: f32 = 1e-5;

/// Absolute bound for values near zero, where a relative bound means nothing.
pub const PLAN_ABSOLUTE_TOLERANCE: f32 = 1e-6;

/// Whether `a` and `b` agree within the plan tolerances.
pub fn plans_agree(a: f32, b: f32) -> bool {
    (a - b).abs() <= PLAN_ABSOLUTE_TOLERANCE + PLAN_RELATIVE_TOLERANCE * a.abs().max(b.abs())
}

/// Fails the test, naming `what`, unless `got` and `expected` have the same length and agree
/// element by element within the plan tolerances.
pub fn assert_plans_agree(what: &str, got: &[f32], expected: &[f32]) {
    assert_eq!(got.len(), expected.len(), "{what}: {got:?} vs {expected:?}");
    assert!(
        got.iter().zip(expected).all(|(&g, &e)| plans_agree(g, e)),
        "{what}: {got:?} vs {expected:?} (tolerance {PLAN_RELATIVE_TOLERANCE:e} relative, \
         {PLAN_ABSOLUTE_TOLERANCE:e} absolute)"
    );
}

/// Raw FP32 tensor bytes (little-endian, as the binary tensor extension sends them) as values;
/// fails the test if the length is not a whole number of floats.
pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    assert_eq!(
        bytes.len() % 4,
        0,
        "{} bytes are not FP32 values",
        bytes.len()
    );
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}
