//! The dot product of two vectors, the cosine similarity of unit vectors: AVX2 and FMA when the
//! CPU has them (checked once), else portable code the compiler vectorises.
//!
//! The crate's only `unsafe` is here: calling a function compiled for CPU features after
//! checking, at run time, that the CPU has them.
#![allow(unsafe_code)]

/// Dot product over the common length of `a` and `b` (the shorter one's; the index always
/// passes two [`crate::vector::DIM`]-long slices).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let common = a.len().min(b.len());
    let (a, b) = (&a[..common], &b[..common]);
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        if *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
        {
            // SAFETY: the CPU supports the features this function is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// The loop both paths share, over two slices of equal length. `FUSED` selects fused
/// multiply-add, which is one instruction where FMA is compiled in and a slow library call
/// where it is not.
#[inline(always)]
fn dot_with<const FUSED: bool>(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    // Sixteen independent accumulators let the compiler vectorise and pipeline the loop.
    let mut acc = [0f32; 16];
    let whole = a.len() / 16 * 16;
    for (ca, cb) in a[..whole].chunks_exact(16).zip(b[..whole].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] = if FUSED {
                ca[i].mul_add(cb[i], acc[i])
            } else {
                acc[i] + ca[i] * cb[i]
            };
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        sum += x * y;
    }
    sum
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    dot_with::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_with::<true>(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    }

    #[test]
    fn both_paths_agree_with_the_naive_sum_at_every_length() {
        // Lengths around the 16-wide chunks exercise the tail loop.
        for n in (0..=40).chain([383, 384, 385]) {
            let (a, b) = (values(n, 1), values(n, 2));
            let expected = naive(&a, &b);
            assert!((dot_portable(&a, &b) - expected).abs() < 1e-4, "n = {n}");
            assert!((dot(&a, &b) - expected).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn unequal_lengths_use_the_common_length() {
        let (long, short) = (values(50, 3), values(17, 4));
        let expected = naive(&long[..17], &short);
        assert!((dot(&long, &short) - expected).abs() < 1e-4);
        assert!((dot(&short, &long) - expected).abs() < 1e-4);
        assert_eq!(dot(&long, &[]), 0.0);
    }
}
