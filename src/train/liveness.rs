//! Which features are alive: the step each feature last fired at, updated after every step, and the dead mask
//! read off it (a feature is dead when it has not fired for more than `dead_window` steps). Shared by the
//! single-process and the distributed trainers.

/// Records that the features with a nonzero count in `active_count` (per layer, per feature) fired at `step`
/// (stored as `step + 1`, so 0 means never).
pub fn mark_fired(last_fired: &mut [Vec<u64>], active_count: &[Vec<u32>], step: u64) {
    for (last, counts) in last_fired.iter_mut().zip(active_count) {
        for (s, c) in last.iter_mut().zip(counts) {
            if *c > 0 {
                *s = step + 1;
            }
        }
    }
}

/// Per layer, per feature: whether the feature has not fired in the last `window` steps before `step`.
pub fn dead_mask(last_fired: &[Vec<u64>], step: u64, window: u64) -> Vec<Vec<bool>> {
    last_fired
        .iter()
        .map(|l| l.iter().map(|s| step.saturating_sub(*s) > window).collect())
        .collect()
}
