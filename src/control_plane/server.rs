//! HTTP server for the embedded control plane. (Being written.)
