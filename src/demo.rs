//! Demo. (Being written.)
