//! The CPU backend: the fast sparse path and, beside it, the dense reference it is tested against.

pub mod adam;
pub mod dense;
pub mod encode;
pub mod gemm;
pub mod sparse;
