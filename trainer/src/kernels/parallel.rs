//! Row-parallel loops on candle's CPU thread pool (the pool its element-wise ops use, so our kernels
//! and candle's never have two sets of threads spinning against each other on few cores).

use std::ops::Range;

/// Runs `f` over `0..n` split into chunks across the pool (inline when already on a pool thread).
pub fn for_chunks(n: usize, f: impl Fn(Range<usize>) + Sync) {
    if n == 0 {
        return;
    }
    if n == 1 {
        f(0..1);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n, f)
}

/// [`for_chunks`] for work that can fail: the first error any chunk returns (a chunk stops at its error;
/// the others finish theirs).
pub fn try_for_chunks<E: Send>(n: usize, f: impl Fn(Range<usize>) -> Result<(), E> + Sync) -> Result<(), E> {
    let failure = std::sync::Mutex::new(None);
    for_chunks(n, |range| {
        if let Err(e) = f(range) {
            if let Ok(mut slot) = failure.lock() {
                slot.get_or_insert(e);
            }
        }
    });
    match failure.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// A raw pointer that may cross to the pool's threads; each thread touches a disjoint part.
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper, not the raw field).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}
// SAFETY: only used to hand disjoint parts of one buffer to the pool's threads.
unsafe impl<T> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedMut<T> {}

/// Calls `f(row, values)` for every `row_len`-sized row of `out`, rows spread over the pool.
pub fn for_rows_mut<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let base = SharedMut(out.as_mut_ptr());
    for_chunks(rows, |range| {
        for r in range {
            // SAFETY: row `r` is in bounds (r < rows) and each row goes to exactly one call.
            let row = unsafe { std::slice::from_raw_parts_mut(base.ptr().add(r * row_len), row_len) };
            f(r, row);
        }
    });
}

/// Calls `f(start, values)` for consecutive spans of `span` values of `out` (the last may be shorter),
/// spans spread over the pool.
pub fn for_spans_mut<T: Send>(out: &mut [T], span: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let span = span.max(1);
    let len = out.len();
    let base = SharedMut(out.as_mut_ptr());
    for_chunks(len.div_ceil(span), |range| {
        for i in range {
            let start = i * span;
            let n = span.min(len - start);
            // SAFETY: span `i` lies inside `out` and each span goes to exactly one call.
            let part = unsafe { std::slice::from_raw_parts_mut(base.ptr().add(start), n) };
            f(start, part);
        }
    });
}
