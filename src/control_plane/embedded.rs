//! The embedded control plane. (Being written.)
