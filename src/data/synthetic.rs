//! The synthetic ground-truth generator (planted cross-layer features).
