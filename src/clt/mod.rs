//! clt (being written).
