//! SQLite state of the embedded control plane. (Being written.)
