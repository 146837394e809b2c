//! The model's sentence vectors: their dimension, and a unit vector checked at both ends.
//!
//! A [`UnitVector`] is checked (dimension and norm) when it is made, again when it is encoded
//! for the store, and again when it is decoded: a pair of assertions at the boundary, so a
//! vector damaged in memory or on disk is refused where it crosses, never ranked.

use std::ops::Deref;

use anyhow::bail;

/// Dimension of the model's sentence vectors.
pub const DIM: usize = 384;
/// Bytes of an encoded vector.
pub const ENCODED_LEN: usize = DIM * 4;
/// How far a unit vector's norm may stray from 1 (f32 rounding over 384 terms).
const NORM_TOLERANCE: f32 = 0.01;

/// A vector of [`DIM`] f32 values with norm 1.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitVector(Vec<f32>);

impl UnitVector {
    /// Checks `values` is a unit vector of the model's dimension.
    pub fn new(values: Vec<f32>) -> anyhow::Result<UnitVector> {
        check(&values)?;
        Ok(UnitVector(values))
    }

    /// Little-endian f32s, checked on the way out (paired with [`UnitVector::decode`]).
    pub fn encode(&self) -> anyhow::Result<Vec<u8>> {
        check(&self.0)?;
        Ok(self.0.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Reads an encoded vector, checked on the way in.
    pub fn decode(bytes: &[u8]) -> anyhow::Result<UnitVector> {
        if bytes.len() != ENCODED_LEN {
            bail!(
                "stored vector has {} bytes, expected {ENCODED_LEN}",
                bytes.len()
            );
        }
        let values = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")))
            .collect();
        UnitVector::new(values)
    }

    pub fn into_inner(self) -> Vec<f32> {
        self.0
    }
}

impl Deref for UnitVector {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

/// Checks a vector is a unit vector of the model's dimension.
pub fn check(vector: &[f32]) -> anyhow::Result<()> {
    if vector.len() != DIM {
        bail!("vector of dimension {}, expected {DIM}", vector.len());
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !((1.0 - NORM_TOLERANCE)..=(1.0 + NORM_TOLERANCE)).contains(&norm) {
        bail!("vector norm {norm}, expected 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_and_bad_ones_are_refused() {
        let basis: Vec<f32> = (0..DIM).map(|i| if i == 3 { 1.0 } else { 0.0 }).collect();
        let v = UnitVector::new(basis).unwrap();
        assert_eq!(UnitVector::decode(&v.encode().unwrap()).unwrap(), v);
        assert!(UnitVector::new(vec![1.0; 3]).is_err());
        assert!(UnitVector::new(vec![0.0; DIM]).is_err());
        assert!(UnitVector::decode(&[0u8; 10]).is_err());
        // Right length, wrong norm: refused on the way in.
        let doubled: Vec<u8> = v.iter().flat_map(|x| (x * 2.0).to_le_bytes()).collect();
        assert!(UnitVector::decode(&doubled).is_err());
    }
}
