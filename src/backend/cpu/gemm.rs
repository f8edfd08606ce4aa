//! A safe single-precision matrix product over the `gemm` crate.
//!
//! Every dense product of the engine (the encoder, the dense reference decoder, skip connections) goes through
//! [`matmul`], which checks that every element the strides can reach lies inside its slice before calling the
//! crate's raw-pointer kernel.

/// A strided view of an `rows × cols` matrix inside a slice: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// A row-major `rows × cols` matrix whose rows start `rs` elements apart (one layer's rows of a
    /// `[B][L][d]` batch, say).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matmul: {what} view out of bounds");
        }
    }
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Run on the calling thread (used inside rayon tasks).
    One,
    /// Use rayon's pool.
    All,
}

/// `c = alpha * c + beta * a · b` for a row-major `c` of `a.rows × b.cols` with row stride `ldc`.
///
/// With `alpha == 0` the previous contents of `c` are ignored (they may be anything, even NaN).
/// Panics (a programming error, not bad input) if the shapes disagree or a view reaches past its slice.
pub fn matmul(
    c: &mut [f32],
    ldc: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    alpha: f32,
    beta: f32,
    threads: Threads,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    a.check("lhs");
    b.check("rhs");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * ldc + n <= c.len() && n <= ldc,
        "matmul: destination out of bounds"
    );
    if k == 0 {
        for i in 0..m {
            for v in &mut c[i * ldc..i * ldc + n] {
                *v = if alpha == 0.0 { 0.0 } else { *v * alpha };
            }
        }
        return;
    }
    let par = match threads {
        Threads::One => gemm::Parallelism::None,
        Threads::All => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: the asserts above prove that every (i, j) the kernel touches, at i * stride + j * stride for
    // i < rows and j < cols of each view, lies inside its slice; `c` is borrowed mutably and cannot alias `a`
    // or `b`, which are shared borrows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            alpha != 0.0,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            alpha,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // n × k
        let mut c = vec![f32::NAN; m * n];
        matmul(
            &mut c,
            n,
            Mat::rows(&a, m, k),
            Mat::rows(&bt, n, k).t(),
            0.0,
            1.0,
            Threads::One,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
