//! Agent runtime. (Being written.)
